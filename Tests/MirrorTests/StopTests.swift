import Foundation
import Glibc
import LibNBD
import Mirror
import TestSupport
import Testing

/// How a server stops: every request in flight is answered, however slow
/// its leg; SIGHUP is a clean stop; a second signal forces the stop; a
/// signal during the start-up stops it before anything is written.
@Suite(.serialized) struct StopTests {
    /// A write on a thread of its own; its outcome once it ends.
    private final class Write: @unchecked Sendable {
        private var thread: Thread!
        private var error: Error?

        init(_ handle: NBDHandle, _ bytes: [UInt8], at offset: UInt64) {
            thread = Thread { [self] in
                do { try handle.write(bytes, at: offset) } catch { self.error = error }
            }
            thread.start()
        }

        /// Waits for the write to end; nil when it succeeded.
        func outcome() -> Error? {
            while !thread.isFinished { usleep(10_000) }
            return error
        }
    }

    /// A mirror of a file and a leg that nbdkit serves from a file.
    private func remoteMirror(_ fixture: MirrorFixture) throws -> (legs: [String], remote: NBDKit) {
        let leg0 = fixture.path("leg0.img"), remoteFile = fixture.path("leg1.img")
        try run(["truncate", "-s", "16M", leg0, remoteFile])
        let remote = try NBDKit(["file", remoteFile])
        try run([dmioNBDExecutable, "create", "--assume-clean", leg0, remote.uri])
        return ([leg0, remote.uri], remote)
    }

    /// SIGTERM while a write waits 12 s for its leg, whose server is frozen
    /// that long (longer than the grace a half-closed client gets): the
    /// write succeeds and the stop is clean.
    @Test func aStopAnswersAWriteHoweverSlowItsLeg() throws {
        let fixture = MirrorFixture()
        let (legs, remote) = try remoteMirror(fixture)
        let server = try fixture.serve(legs)
        let handle = try fixture.connect()
        let bytes = pattern(64 << 10, seed: 51)
        remote.freeze(limit: 12)
        let write = Write(handle, bytes, at: 0)
        usleep(500_000)
        kill(server.process.processIdentifier, SIGTERM)
        #expect(write.outcome() == nil, "the write in flight at the stop succeeds")
        server.process.waitUntilExit()
        #expect(server.process.terminationReason == .exit && server.process.terminationStatus == 0)
        let said = server.stderr()
        #expect(said.contains("waiting for 1 requests in flight"), "\(said)")
        #expect(!said.contains("took no reply"), "\(said)")
        #expect(!said.contains("Cannot schedule tasks"), "\(said)")

        // Stopped cleanly: the next start has nothing to recover, and the data is there.
        let again = try fixture.serve(legs)
        let reader = try fixture.connect()
        #expect(try reader.read(bytes.count, at: 0) == bytes)
        reader.shutdown()
        #expect(again.stop() == 0)
        #expect(!again.stderr().contains("not stopped cleanly"))
    }

    /// A second SIGTERM stops at once, says so, and leaves the mirror to be
    /// recovered at its next start.
    @Test func aSecondSignalForcesTheStop() throws {
        let fixture = MirrorFixture()
        let (legs, remote) = try remoteMirror(fixture)
        let server = try fixture.serve(legs)
        let handle = try fixture.connect()
        remote.freeze(limit: 20)
        let write = Write(handle, pattern(64 << 10, seed: 52), at: 0)
        usleep(500_000)
        kill(server.process.processIdentifier, SIGTERM)
        usleep(500_000)
        kill(server.process.processIdentifier, SIGTERM)
        let deadline = Date().addingTimeInterval(5)
        while server.process.isRunning && Date() < deadline { usleep(20_000) }
        #expect(!server.process.isRunning, "a second signal stops the server at once")
        guard !server.process.isRunning else { return }
        #expect(server.process.terminationReason == .exit && server.process.terminationStatus == 1)
        let said = server.stderr()
        #expect(said.contains("SIGTERM again: stopping now"), "\(said)")
        #expect(write.outcome() != nil, "the write was not answered")
        // Not stopped cleanly: the next start recovers the dirty regions.
        let examined = try run([dmioNBDExecutable, "examine", legs[0], "--json"])
        #expect(try JSONDecoder().decode(LegMetadata.self, from: Data(examined.utf8)).clean == false)
    }

    /// SIGHUP (an ssh session that closes) stops the server cleanly.
    @Test func sighupIsACleanStop() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        let server = try fixture.serve(legs + ["--create", "16M"])
        let handle = try fixture.connect()
        let written = try handle.writeRegions(0..<4, seed: 53)
        handle.shutdown()
        kill(server.process.processIdentifier, SIGHUP)
        server.process.waitUntilExit()
        #expect(server.process.terminationReason == .exit && server.process.terminationStatus == 0)
        let again = try fixture.serve(legs)
        #expect(try fixture.status().dirtyRegions == 0)
        try fixture.connect().expectReadBack(written)
        #expect(again.stop() == 0)
        #expect(!again.stderr().contains("not stopped cleanly"))
    }

    /// SIGTERM while a leg that hangs at connect holds up the start: the
    /// server says which leg it waits for, stops once the leg is given up,
    /// exits 0, and has written nothing.
    @Test func aSignalDuringTheStartUpStopsBeforeAnythingIsWritten() throws {
        let fixture = MirrorFixture()
        let leg0 = fixture.path("leg0.img"), remoteFile = fixture.path("leg1.img")
        try run(["truncate", "-s", "16M", leg0, remoteFile])
        let remote = try NBDKit(["file", remoteFile])
        try run([dmioNBDExecutable, "create", "--assume-clean", leg0, remote.uri])
        let metadata = FileManager.default.contents(atPath: leg0)?.prefix(1 << 20)
        remote.freeze()
        let server = try ServeProcess(arguments: [leg0, remote.uri, "--allow-missing-legs", "--remote-timeout", "3",
                                                  "--socket", fixture.socket], socket: fixture.socket)
        usleep(500_000)
        kill(server.process.processIdentifier, SIGTERM)
        server.process.waitUntilExit()
        #expect(server.process.terminationReason == .exit && server.process.terminationStatus == 0)
        let said = server.stderr()
        #expect(said.contains("leg 1: connecting to \(remote.uri)"), "\(said)")
        #expect(said.contains("SIGTERM during start-up: stopped before the mirror started"), "\(said)")
        #expect(FileManager.default.contents(atPath: leg0)?.prefix(1 << 20) == metadata)
    }
}
