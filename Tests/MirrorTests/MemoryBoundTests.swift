import Foundation
import Glibc
import LibNBD
import TestSupport
import Testing

/// The server's memory is bounded whatever its clients do, and goes back to
/// the kernel once they are done. The bounds asserted here are those the
/// README states: 256 MiB of buffered requests and replies, all clients
/// together, plus at most one request (32 MiB) per event loop (one a core)
/// and the server's own working set; and within a few seconds of the load
/// ending, resident memory near what it was idle.
@Suite(.serialized) struct MemoryBoundTests {
    static let mib = 1 << 20
    /// What the bound lets the server hold above its idle size at most.
    static let peakAboveIdle = (256 + ProcessInfo.processInfo.activeProcessorCount * 32 + 64) * mib
    /// What may stay above the idle size once the load is over: the spare
    /// reply buffers of the loops and what malloc keeps.
    static let settledAboveIdle = 48 * mib

    /// A two-leg mirror of 64 MiB full of data: reads of holes would be
    /// answered without a buffer.
    private func serveMirror(_ fixture: MirrorFixture) throws -> ServeProcess {
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        try run(["dd", "if=/dev/urandom", "of=\(legs[0])", "bs=1M", "count=65", "status=none"])
        try run(["cp", legs[0], legs[1]])
        try run([dmioNBDExecutable, "create", "--assume-clean"] + legs)
        return try fixture.serve(legs)
    }

    /// Sixty clients queue 64 reads of 1 MiB each and take no reply: 3.75
    /// GiB of replies if the server let them pile up.
    @Test func clientsThatTakeNoRepliesHoldTheServersBoundAtMost() throws {
        let (fixture, server) = try expectBoundedAndGivenBack { fixture, target in
            _ = try clientsQueueingReads(fixture, clients: 60, reads: 64, into: target)
            // Long enough for every request the server will start to be answered.
            usleep(3_000_000)
        }
        // Once they are gone, the room is there for others again.
        #expect(try fixture.connect().read(Self.mib, at: 0).count == Self.mib)
        #expect(server.stop() == 0)
    }

    /// Bursts of clients that queue reads and go away without a word.
    @Test func memoryGoesBackAfterBurstsOfClientsThatVanish() throws {
        _ = try expectBoundedAndGivenBack { fixture, target in
            for _ in 0..<3 {
                // Each closes its socket when released, replies unread.
                _ = try clientsQueueingReads(fixture, clients: 100, reads: 16, into: target)
                usleep(500_000)
            }
        }
    }

    /// Ordinary heavy load: fio, four jobs of 64 reads of 1 MiB in flight.
    @Test func memoryGoesBackAfterHeavyReads() throws {
        _ = try expectBoundedAndGivenBack { fixture, _ in
            try run(["fio", "--name=reads", "--ioengine=nbd", "--uri=\(fixture.uri)", "--rw=randread", "--bs=1M",
                     "--iodepth=64", "--numjobs=4", "--time_based", "--runtime=3", "--size=64M"])
        }
    }

    /// Clients that send option after option and read no reply are
    /// dropped, with a log line, before their replies cost memory.
    @Test func handshakeRepliesNobodyReadsAreBounded() throws {
        let fixture = MirrorFixture()
        let server = try serveMirror(fixture)
        let idle = try Memory(of: server)
        let started = Date()
        let clients = try (0..<4).map { _ in try OptionFlood(socket: fixture.socket) }
        var dropped = Array(repeating: false, count: clients.count)
        while dropped.contains(false) && Date().timeIntervalSince(started) < 20 {
            for (index, client) in clients.enumerated() where !dropped[index] {
                dropped[index] = client.sendOptions()
            }
        }
        #expect(dropped == [true, true, true, true], "every flooding client is dropped")
        #expect(try Memory(of: server).peak - idle.resident < 64 * Self.mib)
        let other = try fixture.connect()
        #expect(try other.read(4096, at: 0).count == 4096)
        other.shutdown()
        #expect(server.stop() == 0)
        #expect(server.stderr().contains("the client takes none of its option replies"))
    }

    /// `clients` connections that each queue `reads` reads of 1 MiB and
    /// never take a reply (the replies would all land in `target`).
    private func clientsQueueingReads(_ fixture: MirrorFixture, clients: Int, reads: Int,
                                      into target: UnsafeMutableRawPointer) throws -> [NBDHandle] {
        try (0..<clients).map { _ in
            let client = try fixture.connect()
            for request in 0..<reads {
                try client.aioPread(into: target, count: Self.mib, offset: UInt64(request * Self.mib),
                                    userData: target, completion: { _, _ in 1 })
            }
            return client
        }
    }

    /// Runs `load` against a served mirror (with 1 MiB of memory that the
    /// replies nobody takes would land in), then expects the server's peak
    /// within the bound and its resident memory back near idle within 10 s.
    private func expectBoundedAndGivenBack(
        _ load: (MirrorFixture, UnsafeMutableRawPointer) throws -> Void,
        sourceLocation: SourceLocation = #_sourceLocation
    ) throws -> (MirrorFixture, ServeProcess) {
        let fixture = MirrorFixture()
        let server = try serveMirror(fixture)
        let idle = try Memory(of: server)
        let target = UnsafeMutableRawPointer.allocate(byteCount: Self.mib, alignment: 4096)
        defer { target.deallocate() }
        try load(fixture, target)
        let loaded = try Memory(of: server)
        #expect(loaded.peak - idle.resident < Self.peakAboveIdle,
                "peak \(loaded.peak / Self.mib) MiB, idle \(idle.resident / Self.mib) MiB", sourceLocation: sourceLocation)
        let deadline = Date().addingTimeInterval(10)
        var now = loaded
        while now.resident - idle.resident >= Self.settledAboveIdle && Date() < deadline {
            usleep(200_000)
            now = try Memory(of: server)
        }
        #expect(now.resident - idle.resident < Self.settledAboveIdle,
                "resident \(now.resident / Self.mib) MiB 10 s after the load, idle \(idle.resident / Self.mib) MiB",
                sourceLocation: sourceLocation)
        return (fixture, server)
    }
}

/// A process's resident memory now and at its peak (VmRSS, VmHWM), in bytes.
private struct Memory {
    var resident: Int
    var peak: Int

    init(of server: ServeProcess) throws {
        let status = try String(contentsOfFile: "/proc/\(server.process.processIdentifier)/status", encoding: .utf8)
        func field(_ name: String) -> Int {
            let line = status.split(separator: "\n").first { $0.hasPrefix(name + ":") } ?? ""
            return (Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0) * 1024
        }
        resident = field("VmRSS")
        peak = field("VmHWM")
    }
}

/// A hostile client no library would be: it greets the server, then sends
/// NBD_OPT_LIST after NBD_OPT_LIST and never reads a reply.
private final class OptionFlood {
    private let descriptor: Int32
    private let options: [UInt8]

    init(socket path: String) throws {
        descriptor = try connectedUnixSocket(path)
        let list: [UInt8] = Array("IHAVEOPT".utf8) + [0, 0, 0, 3] + [0, 0, 0, 0]
        options = Array([[UInt8]](repeating: list, count: 4096).joined())
        var greeting = [UInt8](repeating: 0, count: 18)
        guard recv(descriptor, &greeting, 18, Int32(MSG_WAITALL)) == 18 else { throw POSIXError(.EIO) }
        // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
        var flags: [UInt8] = [0, 0, 0, 3]
        guard send(descriptor, &flags, 4, 0) == 4 else { throw POSIXError(.EIO) }
        _ = fcntl(descriptor, F_SETFL, fcntl(descriptor, F_GETFL) | O_NONBLOCK)
    }

    /// Sends as many options as the socket takes; returns whether the
    /// server has closed the connection.
    func sendOptions() -> Bool {
        let sent = options.withUnsafeBytes { send(descriptor, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        if sent < 0 && errno != EAGAIN { return true }
        if sent < 0 { usleep(1_000) }
        return false
    }

    deinit { close(descriptor) }
}
