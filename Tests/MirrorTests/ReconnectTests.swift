import Foundation
import LibNBD
import Mirror
import TestSupport
import Testing

/// Remote legs whose server goes away (killed with SIGKILL) and comes back
/// on the same socket: taken back by the server itself, with a copy of what
/// they missed, or refused when what comes back is not that leg.
@Suite(.serialized) struct ReconnectTests {
    /// A mirror, in sync, of a local leg 0 and leg 1 a file behind nbdkit
    /// on a socket that a restarted nbdkit takes again.
    private struct RemoteMirror {
        let leg0: String
        let remoteFile: String
        let socket: String
        var remote: NBDKit?

        init(_ fixture: MirrorFixture) throws {
            leg0 = fixture.path("leg0.img")
            remoteFile = fixture.path("leg1.img")
            socket = fixture.path("remote.sock")
            try run(["truncate", "-s", "64M", leg0, remoteFile])
            remote = try NBDKit(["file", remoteFile], socket: socket)
            try run([dmioNBDExecutable, "create", "--assume-clean", leg0, remote!.uri])
        }

        var uri: String { "nbd+unix:///?socket=\(socket)" }
        var legs: [String] { [leg0, uri] }

        mutating func restart(serving file: String) throws {
            remote = try NBDKit(["file", file], socket: socket)
        }
    }

    @Test func aKilledRemoteLegComesBackByItselfWithAPartialCopy() throws {
        let fixture = MirrorFixture()
        var legs = try RemoteMirror(fixture)
        let server = try fixture.serve(legs.legs + ["--reconnect-interval", "0.2"])
        let handle = try fixture.connect()
        let before = try handle.writeRegions(0..<4, seed: 41)
        legs.remote?.kill()
        let missed = try handle.writeRegions(8..<12, seed: 42)
        let out = try fixture.status()
        // A lost connection, however it showed (ENOTCONN, or ECONNRESET, EPIPE mid-write).
        #expect(out.state(1) == .degraded && ["ENOTCONN", "ECONNRESET", "EPIPE"].contains(out.legs[1].errno), "\(out.legs[1])")
        try legs.restart(serving: legs.remoteFile)
        let back = try fixture.waitFor("leg 1 back by itself", timeout: 20) { $0.allInSync }
        // The regions written while it was away, not the whole leg.
        #expect(back.resync.regionsTotal >= 4 && back.resync.regionsTotal < back.regions / 2, "\(back.resync)")
        try handle.expectReadBack(before.merging(missed) { $1 })
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs.leg0, legs.remoteFile))
        #expect(server.stderr().contains("remote leg \(legs.uri) answers again: re-added"))
    }

    /// The operator fails a remote leg that is out for its lost connection:
    /// it is not taken back once its server answers, nor at the next start,
    /// but only by `readd-leg`.
    @Test func aLostRemoteLegFailedByTheOperatorStaysOut() throws {
        let fixture = MirrorFixture()
        var legs = try RemoteMirror(fixture)
        let arguments = legs.legs + ["--reconnect-interval", "0.2"]
        var server = try fixture.serve(arguments)
        var handle = try fixture.connect()
        legs.remote?.kill()
        var written = try handle.writeRegions(0..<2, seed: 44)
        #expect(try fixture.status().state(1) == .degraded)
        let failed = try fixture.control(["fail-leg", "1"])
        #expect(failed.legs[1].why == "operator", "\(failed.legs[1])")
        try legs.restart(serving: legs.remoteFile)
        usleep(2_000_000)
        #expect(try fixture.status().state(1) == .degraded, "not tried again")

        handle.shutdown()
        #expect(server.stop() == 0)
        server = try fixture.serve(arguments)
        usleep(2_000_000)
        #expect(try fixture.status().legs[1].why == "operator", "still out after a restart")
        handle = try fixture.connect()
        written.merge(try handle.writeRegions(4..<6, seed: 45)) { $1 }
        try fixture.control(["readd-leg", "1"])
        try fixture.waitFor("leg 1 in sync") { $0.allInSync }
        try handle.expectReadBack(written)
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs.leg0, legs.remoteFile))
        #expect(!server.stderr().contains("answers again"))
    }

    @Test func aRemoteLegThatComesBackAsAnotherMirrorsLegIsNotTakenBack() throws {
        let fixture = MirrorFixture()
        var legs = try RemoteMirror(fixture)
        let server = try fixture.serve(legs.legs + ["--reconnect-interval", "0.2"])
        let watcher = try EventTests.Watcher(["--now", "--socket", fixture.socket])
        watcher.waitFor("exists -", timeout: 10)
        let handle = try fixture.connect()
        legs.remote?.kill()
        _ = try handle.writeRegions(0..<2, seed: 43)
        #expect(try fixture.status().state(1) == .degraded)
        // The server comes back serving a leg of another mirror.
        let other = [fixture.path("other0.img"), fixture.path("other1.img")]
        try run(["truncate", "-s", "64M"] + other)
        try run([dmioNBDExecutable, "create", "--assume-clean"] + other)
        try legs.restart(serving: other[1])
        watcher.waitFor("reconnect leg", "leg:1", "result:refused", timeout: 10)
        usleep(1_000_000)
        let status = try fixture.status()
        #expect(status.state(1) == .degraded, "\(status.legs[1])")
        // Refused for good: nothing tried since, and nothing written to it.
        #expect(watcher.lines.filter { $0.hasPrefix("reconnect leg") }.count == 1)
        let examined = try run([dmioNBDExecutable, "examine", other[1], "--json"])
        #expect(!examined.contains(status.uuid))
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(server.stderr().contains("answers, but is not taken back"))
    }
}
