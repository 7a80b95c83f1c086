import Foundation
import LibNBD
import Mirror
import TestSupport
import Testing

/// A folder for one test's legs and sockets, and the `dmio-nbd` commands
/// that serve and steer a mirror of them. Removed when released.
final class MirrorFixture {
    let folder: String
    var socket: String { folder + "/nbd.sock" }
    var uri: String { "nbd+unix:///?socket=\(socket)" }
    private var mounts: [String] = []

    init(in base: String = "/tmp") {
        var template = Array("\(base)/mirror-test-XXXXXX".utf8CString)
        folder = String(cString: mkdtemp(&template)!)
    }

    func path(_ name: String) -> String { folder + "/" + name }

    /// Starts `dmio-nbd serve` with these arguments and waits until it listens.
    func serve(_ arguments: [String]) throws -> ServeProcess {
        let server = try ServeProcess(arguments: arguments + ["--socket", socket], socket: socket)
        try server.waitUntilListening()
        return server
    }

    /// Runs `dmio-nbd serve` (on `socket` unless given another) expecting it
    /// to refuse within 30 s; returns what it said.
    func serveRefused(_ arguments: [String], socket: String? = nil) throws -> String {
        let socket = socket ?? self.socket
        let server = try ServeProcess(arguments: arguments + ["--socket", socket], socket: socket)
        let deadline = Date().addingTimeInterval(30)
        while server.process.isRunning && Date() < deadline { usleep(20_000) }
        guard !server.process.isRunning else {
            _ = server.stop(signal: SIGKILL)
            Issue.record("dmio-nbd serve \(arguments) did not refuse within 30 s")
            return server.stderr()
        }
        #expect(server.process.terminationStatus != 0)
        return server.stderr()
    }

    /// `dmio-nbd <words> --socket S --json`: the mirror's status after the request.
    @discardableResult
    func control(_ words: [String]) throws -> MirrorStatus {
        let output = try run([dmioNBDExecutable] + words + ["--socket", socket, "--json"])
        let printed = try JSONDecoder().decode(StatusOutput.self, from: Data(output.utf8))
        #expect(printed.version == 1)
        #expect(printed.mirrors.count == 1)
        return printed.mirrors[0].mirror
    }

    func status() throws -> MirrorStatus { try control(["status"]) }

    /// Polls the status until `condition` holds (10 s at most).
    @discardableResult
    func waitFor(_ what: String, timeout: Double = 10, _ condition: (MirrorStatus) -> Bool) throws -> MirrorStatus {
        let deadline = Date().addingTimeInterval(timeout)
        var last = try status()
        while !condition(last) {
            guard Date() < deadline else {
                throw CommandFailed(command: "wait for \(what)", status: -1, output: "\(last)")
            }
            usleep(50_000)
            last = try status()
        }
        return last
    }

    func connect() throws -> NBDHandle {
        let handle = try NBDHandle()
        try handle.connect(unixSocket: socket)
        return handle
    }

    /// A tmpfs of `size` mounted inside the folder: a leg there fills up.
    func smallTmpfs(_ name: String, size: String) throws -> String {
        let mountPoint = path(name)
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        try run(["mount", "-t", "tmpfs", "-o", "size=\(size)", "tmpfs", mountPoint])
        mounts.append(mountPoint)
        return mountPoint
    }

    /// Mounts `device` (a file system on it) inside the folder, until released.
    func mount(_ device: String, at name: String) throws -> String {
        let mountPoint = path(name)
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        try run(["mount", device, mountPoint])
        mounts.append(mountPoint)
        return mountPoint
    }

    func resize(tmpfs mountPoint: String, to size: String) throws {
        try run(["mount", "-o", "remount,size=\(size)", mountPoint])
    }

    /// Whether the data areas of two leg files hold the same bytes.
    func legsEqual(_ a: String, _ b: String, dataOffset: UInt64 = 1 << 20) -> Bool {
        (try? run(["cmp", "-i", "\(dataOffset)", a, b])) != nil
    }

    deinit {
        for mountPoint in mounts.reversed() { _ = try? run(["umount", "-l", mountPoint]) }
        try? FileManager.default.removeItem(atPath: folder)
    }

    /// What `--json` prints (the README lists its fields).
    struct StatusOutput: Decodable {
        struct Report: Decodable {
            var mirror: MirrorStatus
            var served: [String]
        }
        var version: Int
        var mirrors: [Report]
    }
}

/// The region size of the mirrors the tests make (the default).
let testRegionBytes = 512 << 10

extension NBDHandle {
    /// Writes 64 KiB of distinct data at the start of each region of
    /// `regions`; returns what went where.
    func writeRegions(_ regions: Range<Int>, seed: UInt8) throws -> [Int: [UInt8]] {
        var written: [Int: [UInt8]] = [:]
        for region in regions {
            let bytes = pattern(64 << 10, seed: seed &+ UInt8(truncatingIfNeeded: region))
            try write(bytes, at: UInt64(region * testRegionBytes))
            written[region] = bytes
        }
        return written
    }

    /// Expects each region's data, as `writeRegions` wrote it, to read back.
    func expectReadBack(_ written: [Int: [UInt8]]) throws {
        for (region, bytes) in written.sorted(by: { $0.key < $1.key }) {
            #expect(try read(bytes.count, at: UInt64(region * testRegionBytes)) == bytes, "region \(region)")
        }
    }
}

extension MirrorStatus {
    func state(_ leg: Int) -> LegState { legs[leg].state }
    var allInSync: Bool { legs.allSatisfy { $0.state == .inSync } && !resync.active }
}

/// A mirror of a local leg 0 and a leg 1 behind nbdkit's error filter, made
/// in sync: leg 1's writes fail with `errno` while `failWrites` holds.
struct FailingLegMirror {
    let leg0: String
    let remoteFile: String
    private let trigger: String
    let remote: NBDKit

    init(_ fixture: MirrorFixture, errno: String, size: String = "64M") throws {
        leg0 = fixture.path("leg0.img")
        remoteFile = fixture.path("leg1.img")
        trigger = fixture.path("fail-writes")
        try run(["truncate", "-s", size, remoteFile, leg0])
        remote = try NBDKit(["--filter=error", "file", remoteFile, "error-pwrite=\(errno)",
                             "error-pwrite-rate=100%", "error-pwrite-file=\(trigger)"])
        try run([dmioNBDExecutable, "create", "--assume-clean", leg0, remote.uri])
    }

    var legs: [String] { [leg0, remote.uri] }

    func failWrites() { _ = FileManager.default.createFile(atPath: trigger, contents: nil) }
    func healWrites() throws { try FileManager.default.removeItem(atPath: trigger) }
}
