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
    /// leg 2 itself is failed afterwards. Neither was ever used alone.
    @Test func aLegFailedAfterItRecordedAnotherLegsFailureComesBack() throws {
        let fixture = MirrorFixture()
        let leg0 = fixture.path("leg0.img"), leg1 = fixture.path("leg1.img"), remoteFile = fixture.path("leg2.img")
        try run(["truncate", "-s", "32M", leg0, leg1, remoteFile])
        let remoteSocket = fixture.path("leg2.sock")
        var remote = try NBDKit(["file", remoteFile], socket: remoteSocket)
        let legs = [leg0, leg1, remote.uri]
        try run([dmioNBDExecutable, "create", "--assume-clean"] + legs)
        var server = try fixture.serve(legs)
        var handle = try fixture.connect()

        try fixture.control(["fail-leg", "0"])
        var written = try handle.writeRegions(0..<3, seed: 21)
        remote.kill()
        written.merge(try handle.writeRegions(3..<6, seed: 22)) { $1 }
        #expect(try fixture.status().legs.map(\.state) == [.degraded, .inSync, .degraded])
        remote = try NBDKit(["file", remoteFile], socket: remoteSocket)
        try fixture.control(["readd-leg", "0"])
        try fixture.waitFor("leg 0 in sync") { $0.state(0) == .inSync && !$0.resync.active }
        written.merge(try handle.writeRegions(6..<8, seed: 23)) { $1 }
        handle.shutdown()
        #expect(server.stop() == 0)

        // A clean stop and a start with every leg: leg 2 is behind, not diverged.
        server = try fixture.serve(legs)
        #expect(try fixture.status().legs.map(\.state) == [.inSync, .inSync, .degraded])
        try fixture.control(["readd-leg", "2"])
        let status = try fixture.waitFor("every leg in sync") { $0.allInSync }
        #expect(status.resync.lastResult.contains("copied 8 of 8 regions"), "\(status.resync.lastResult)")
        handle = try fixture.connect()
        try handle.expectReadBack(written)
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(leg0, leg1))
        #expect(fixture.legsEqual(leg0, remoteFile))
    }

    /// The same turns without a restart between them: leg 2 is re-added
    /// while the server that failed it still runs.
    @Test func aLegFailedAfterItRecordedAnotherLegsFailureIsReaddedOnline() throws {
        let fixture = MirrorFixture()
        let leg0 = fixture.path("leg0.img"), leg1 = fixture.path("leg1.img"), remoteFile = fixture.path("leg2.img")
        try run(["truncate", "-s", "32M", leg0, leg1, remoteFile])
        let remoteSocket = fixture.path("leg2.sock")
        var remote = try NBDKit(["file", remoteFile], socket: remoteSocket)
        let legs = [leg0, leg1, remote.uri]
        try run([dmioNBDExecutable, "create", "--assume-clean"] + legs)
        let server = try fixture.serve(legs)
        let handle = try fixture.connect()

        try fixture.control(["fail-leg", "0"])
        var written = try handle.writeRegions(0..<3, seed: 24)
        remote.kill()
        written.merge(try handle.writeRegions(3..<6, seed: 25)) { $1 }
        remote = try NBDKit(["file", remoteFile], socket: remoteSocket)
        try fixture.control(["readd-leg", "0"])
        try fixture.waitFor("leg 0 in sync") { $0.state(0) == .inSync && !$0.resync.active }
        try fixture.control(["readd-leg", "2"])
        try fixture.waitFor("every leg in sync") { $0.allInSync }
        try handle.expectReadBack(written)
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(leg0, leg1))
        #expect(fixture.legsEqual(leg0, remoteFile))
    }
}
