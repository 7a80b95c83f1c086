import Foundation
import LibNBD
import Mirror
import TestSupport
import Testing

/// Legs that leave and come back in turns: only a leg that was written
/// after it was failed may be refused, never one that is merely behind.
@Suite(.serialized) struct ReturningLegTests {
    /// Legs 0 and 1 are files; leg 2 is served by nbdkit, on a socket that a
    /// restarted nbdkit takes again. Leg 0 is failed by the operator, then
    /// leg 2's server dies: leg 2's metadata records leg 0 as failed, and
    /// leg 2 itself is failed afterwards. Neither was ever used alone. Leg
    /// 0 is re-added; leg 2's server comes back.
    private struct Turns {
        let leg0: String, leg1: String, remoteFile: String
        let legs: [String]
        let remote: NBDKit
        let server: ServeProcess
        let handle: NBDHandle
        let written: [Int: [UInt8]]

        init(_ fixture: MirrorFixture, seed: UInt8) throws {
            leg0 = fixture.path("leg0.img")
            leg1 = fixture.path("leg1.img")
            remoteFile = fixture.path("leg2.img")
            try run(["truncate", "-s", "32M", leg0, leg1, remoteFile])
            let remoteSocket = fixture.path("leg2.sock")
            let first = try NBDKit(["file", remoteFile], socket: remoteSocket)
            legs = [leg0, leg1, first.uri]
            try run([dmioNBDExecutable, "create", "--assume-clean"] + legs)
            // The operator re-adds leg 2: the server does not try it again by itself.
            server = try fixture.serve(legs + ["--reconnect-interval", "0"])
            handle = try fixture.connect()

            try fixture.control(["fail-leg", "0"])
            var written = try handle.writeRegions(0..<3, seed: seed)
            first.kill()
            written.merge(try handle.writeRegions(3..<6, seed: seed + 1)) { $1 }
            #expect(try fixture.status().legs.map(\.state) == [.degraded, .inSync, .degraded])
            remote = try NBDKit(["file", remoteFile], socket: remoteSocket)
            try fixture.control(["readd-leg", "0"])
            try fixture.waitFor("leg 0 in sync") { $0.state(0) == .inSync && !$0.resync.active }
            self.written = written
        }

        func stopAndCompare(_ fixture: MirrorFixture, _ server: ServeProcess, _ handle: NBDHandle) {
            handle.shutdown()
            #expect(server.stop() == 0)
            #expect(fixture.legsEqual(leg0, leg1))
            #expect(fixture.legsEqual(leg0, remoteFile))
        }
    }

    /// After a clean stop, a start with every leg: leg 2 is behind, not
    /// diverged, and its re-add copies only the regions written meanwhile.
    @Test func aLegFailedAfterItRecordedAnotherLegsFailureComesBack() throws {
        let fixture = MirrorFixture()
        let turns = try Turns(fixture, seed: 21)
        var written = turns.written
        written.merge(try turns.handle.writeRegions(6..<8, seed: 23)) { $1 }
        turns.handle.shutdown()
        #expect(turns.server.stop() == 0)

        // Re-added by the operator here too: a leg coming back by itself
        // could be in sync before the `readd-leg` below.
        let server = try fixture.serve(turns.legs + ["--reconnect-interval", "0"])
        #expect(try fixture.status().legs.map(\.state) == [.inSync, .inSync, .degraded])
        try fixture.control(["readd-leg", "2"])
        let status = try fixture.waitFor("every leg in sync") { $0.allInSync }
        #expect(status.resync.lastResult.contains("copied 8 of 8 regions"), "\(status.resync.lastResult)")
        let handle = try fixture.connect()
        try handle.expectReadBack(written)
        turns.stopAndCompare(fixture, server, handle)
    }

    /// The same turns, and leg 2 re-added while the server that failed it
    /// still runs.
    @Test func aLegFailedAfterItRecordedAnotherLegsFailureIsReaddedOnline() throws {
        let fixture = MirrorFixture()
        let turns = try Turns(fixture, seed: 24)
        try fixture.control(["readd-leg", "2"])
        try fixture.waitFor("every leg in sync") { $0.allInSync }
        try turns.handle.expectReadBack(turns.written)
        turns.stopAndCompare(fixture, turns.server, turns.handle)
    }

    /// Leg 1 fails the first metadata write of a clearing of bits: it took
    /// every write and flush before, so it is only behind, and its re-add
    /// copies the dirty regions, not all. (A leg that failed the clearing's
    /// bitmap write was once taken for an old copy: a full copy.)
    @Test func aLegThatFailsTheClearingOfBitsIsOnlyBehind() throws {
        let fixture = MirrorFixture()
        let legs = try FailingLegMirror(fixture, errno: "EIO")
        // No lease: its renewals would be leg 1's next write.
        let server = try fixture.serve(legs.legs + ["--lease", "0"])
        let handle = try fixture.connect()
        var written = try handle.writeRegions(0..<4, seed: 71)
        try handle.flush()
        // The legs idle from now on: leg 1's next write is the clearing's.
        legs.failWrites()
        try fixture.waitFor("leg 1 to fail the clearing", timeout: 20) { $0.state(1) == .degraded }
        written.merge(try handle.writeRegions(8..<10, seed: 72)) { $1 }
        try legs.healWrites()
        try fixture.control(["readd-leg", "1"])
        let status = try fixture.waitFor("leg 1 in sync") { $0.allInSync }
        #expect(status.resync.lastResult.contains("copied 6 of 6 regions"), "\(status.resync.lastResult)")
        #expect(!server.stderr().contains("full copy"), "\(server.stderr())")
        try handle.expectReadBack(written)
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs.leg0, legs.remoteFile))
    }

    /// Leg 1 gets a copy of every region; then, read alone, it holds what
    /// was written, and the legs are equal.
    private func expectFullCopy(_ fixture: MirrorFixture, _ server: ServeProcess, _ legs: [String],
                                _ written: [Int: [UInt8]]) throws {
        let status = try fixture.waitFor("leg 1 in sync") { $0.allInSync }
        #expect(status.resync.lastResult.contains("of \(status.regions) regions"), "\(status.resync.lastResult)")
        try fixture.control(["fail-leg", "0"])
        try fixture.connect().expectReadBack(written)
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs[0], legs[1]))
    }

    /// An old copy of a leg put back while the leg was out: bits were
    /// cleared since the copy was made, so the bitmap cannot say what it
    /// misses, and re-adding it copies everything.
    @Test func anOldCopyOfAFailedLegPutBackGetsAFullCopy() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        var server = try fixture.serve(legs + ["--create", "16M"])
        #expect(server.stop() == 0)
        try FileManager.default.copyItem(atPath: legs[1], toPath: fixture.path("leg1.backup"))

        server = try fixture.serve(legs)
        let handle = try fixture.connect()
        var written = try handle.writeRegions(0..<4, seed: 61)
        try fixture.waitFor("the bits to be cleared", timeout: 20) { $0.dirtyRegions == 0 }
        try fixture.control(["fail-leg", "1"])
        written.merge(try handle.writeRegions(10..<12, seed: 62)) { $1 }
        handle.shutdown()
        #expect(server.stop() == 0)

        try FileManager.default.removeItem(atPath: legs[1])
        try FileManager.default.moveItem(atPath: fixture.path("leg1.backup"), toPath: legs[1])
        server = try fixture.serve(legs)
        try fixture.control(["readd-leg", "1"])
        try expectFullCopy(fixture, server, legs, written)
    }

    /// A leg served on its own and written (serve --force) gets a full copy
    /// when the mirror starts again: its data may differ anywhere.
    @Test func aLegServedRawAndWrittenGetsAFullCopy() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        var server = try fixture.serve(legs + ["--create", "16M"])
        var handle = try fixture.connect()
        let written = try handle.writeRegions(0..<4, seed: 63)
        handle.shutdown()
        #expect(server.stop() == 0)

        server = try fixture.serve([legs[1], "--force"])
        handle = try fixture.connect()
        try handle.write(pattern(64 << 10, seed: 64), at: 8 << 20)
        handle.shutdown()
        #expect(server.stop() == 0)

        server = try fixture.serve(legs)
        try expectFullCopy(fixture, server, legs, written)
        #expect(server.stderr().contains("was served on its own, writable: it gets a full copy"))
    }
}
