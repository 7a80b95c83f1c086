import Foundation
import LibNBD
import TestSupport
import Testing

/// `serve --min-in-sync-legs 2`: leg 1 behind nbdkit's error filter fails
/// its writes for real; once only leg 0 is in sync, writes fail with EIO
/// (`--on-lost-redundancy fail`) or wait (`hold`) until leg 1 is re-added
/// and copied to, and reads go on all along.
@Suite(.serialized) struct RedundancyTests {
    /// A mirror of a local leg 0 and a leg 1 behind nbdkit's error filter.
    private struct Degraded {
        let fixture: MirrorFixture
        let legs: FailingLegMirror
        let server: ServeProcess
        let handle: NBDHandle
        /// Regions 0 and 1, written before and as leg 1 failed.
        let written: [Int: [UInt8]]
    }

    /// Serves the mirror with `--min-in-sync-legs 2` and `arguments`, writes
    /// region 0, then fails leg 1's writes and writes region 1: that write
    /// degrades leg 1 (leg 0 took it).
    private func degradedMirror(_ arguments: [String] = []) throws -> Degraded {
        let fixture = MirrorFixture()
        let legs = try FailingLegMirror(fixture, errno: "EIO")
        let server = try fixture.serve(legs.legs + ["--min-in-sync-legs", "2"] + arguments)
        let handle = try fixture.connect()
        var written = try handle.writeRegions(0..<1, seed: 1)
        legs.failWrites()
        written.merge(try handle.writeRegions(1..<2, seed: 2)) { $1 }
        try fixture.waitFor("leg 1 degraded") { $0.state(1) == .degraded }
        return Degraded(fixture: fixture, legs: legs, server: server, handle: handle, written: written)
    }

    /// Leg 1 takes writes again, and is re-added (its copy starts).
    private func bringBack(_ mirror: Degraded) throws {
        try mirror.legs.healWrites()
        try mirror.fixture.control(["readd-leg", "1"])
    }

    private func writeFails(_ handle: NBDHandle, region: Int) -> Int32? {
        do {
            _ = try handle.writeRegions(region..<(region + 1), seed: 9)
            return nil
        } catch let error as NBDError {
            return error.errno
        } catch {
            return -1
        }
    }

    @Test func withTooFewLegsInSyncWritesFailWithEIOUntilALegIsBack() throws {
        let mirror = try degradedMirror()
        #expect(writeFails(mirror.handle, region: 2) == EIO)
        #expect(mirror.server.stderr().contains("--min-in-sync-legs 2"), "the log says why")
        try mirror.handle.expectReadBack(mirror.written)
        try bringBack(mirror)
        try mirror.fixture.waitFor("leg 1 in sync") { $0.allInSync }
        #expect(writeFails(mirror.handle, region: 2) == nil, "two legs in sync take writes again")
        mirror.handle.shutdown()
        #expect(mirror.server.stop() == 0)
    }

    @Test func heldWritesGoOnOnceALegIsBackInSync() throws {
        let mirror = try degradedMirror(["--on-lost-redundancy", "hold"])
        let held = HeldWrite(mirror.fixture, region: 3)
        #expect(!held.done(within: 1), "the write waits while one leg is in sync")
        try mirror.handle.expectReadBack(mirror.written)
        try bringBack(mirror)
        #expect(held.done(within: 10))
        #expect(held.result == nil, "\(String(describing: held.result))")
        try mirror.fixture.waitFor("leg 1 in sync") { $0.allInSync }
        try mirror.handle.expectReadBack(mirror.written.merging(held.written) { $1 })
        mirror.handle.shutdown()
        #expect(mirror.server.stop() == 0)
    }

    @Test func aStopFailsTheHeldWritesAtOnce() throws {
        let mirror = try degradedMirror(["--on-lost-redundancy", "hold"])
        let held = HeldWrite(mirror.fixture, region: 3)
        #expect(!held.done(within: 0.5))
        // A stop answers every request in flight first: this one must fail,
        // not wait for a leg that may never come.
        let server = mirror.server
        let started = Date()
        kill(server.process.processIdentifier, SIGTERM)
        while server.process.isRunning && Date().timeIntervalSince(started) < 5 { usleep(20_000) }
        #expect(!server.process.isRunning, "the stop waits for the held write")
        #expect(server.stop(signal: server.process.isRunning ? SIGKILL : 0) == 0)
        #expect(held.done(within: 5))
        #expect(held.result == EIO, "the held write failed: \(String(describing: held.result))")
        mirror.handle.shutdown()
    }

    @Test func aPolicyThatCannotHoldIsRefused() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        let refused = try fixture.serveRefused(legs + ["--create", "16M", "--min-in-sync-legs", "3"])
        #expect(refused.contains("--min-in-sync-legs 3"), "\(refused)")
        let alone = try fixture.serveRefused(legs + ["--create", "16M", "--on-lost-redundancy", "hold"])
        #expect(alone.contains("--min-in-sync-legs 2 or more"), "\(alone)")
    }
}

/// A write to one region on a connection of its own, on a thread of its
/// own: it may wait.
private final class HeldWrite: @unchecked Sendable {
    let written: [Int: [UInt8]]
    private let finished = DispatchSemaphore(value: 0)
    /// The errno it failed with; nil when it succeeded.
    private(set) var result: Int32?

    init(_ fixture: MirrorFixture, region: Int) {
        let bytes = pattern(64 << 10, seed: 77)
        written = [region: bytes]
        let socket = fixture.socket
        Thread.detachNewThread { [self] in
            do {
                let handle = try NBDHandle()
                try handle.connect(unixSocket: socket)
                try handle.write(bytes, at: UInt64(region * testRegionBytes))
                handle.shutdown()
            } catch let error as NBDError {
                result = error.errno
            } catch {
                result = -1
            }
            finished.signal()
        }
    }

    func done(within seconds: Double) -> Bool {
        finished.wait(timeout: .now() + seconds) == .success
    }
}
