import Foundation
import LibNBD
import Mirror
import TestSupport
import Testing

/// Two servers on two machines over the same remote legs (DRBD's split
/// brain): the second is refused while the first holds its lease, takes
/// over once the first is frozen past it, and the first, thawed, writes
/// nothing more. The second machine is a mount namespace of its own (its
/// own /run/lock, so the mirror's per-machine lock does not see the first)
/// with a host id of its own.
@Suite(.serialized) struct OwnershipTests {
    private let hostA = "a0000000000000000000000000000001"
    private let hostB = "b0000000000000000000000000000002"
    private let hostC = "c0000000000000000000000000000003"

    /// `dmio-nbd serve` as the server on machine B.
    private func serveOnB(_ fixture: MirrorFixture, _ arguments: [String]) throws -> ServeProcess {
        try serve(on: "b", host: hostB, fixture, arguments)
    }

    /// `dmio-nbd serve` as the server on another machine, `name`; as pid 1
    /// of a pid namespace of its own with `asPID1`, as in a container. There
    /// `unshare` stays, the server's parent, and takes no SIGTERM: a SIGKILL
    /// to it kills the server too.
    private func serve(on name: String, host: String, _ fixture: MirrorFixture,
                       _ arguments: [String], asPID1: Bool = false) throws -> ServeProcess {
        let socket = fixture.path("\(name).sock")
        let unshare = ["/usr/bin/unshare"] + (asPID1 ? ["--pid", "--fork", "--kill-child=SIGKILL"] : [])
        return try ServeProcess(arguments: arguments + ["--socket", socket, "--control", fixture.path("\(name).ctl"),
                                                        "--host-id", host],
                                socket: socket,
                                launcher: unshare + ["--mount", "--propagation", "private", "sh", "-c",
                                                     "mount -t tmpfs tmpfs /run/lock && exec \"$0\" \"$@\""])
    }

    /// A new mirror of two files each behind nbdkit: the servers keep them.
    private func remoteMirror(_ fixture: MirrorFixture) throws -> (files: [String], remotes: [NBDKit], legs: [String]) {
        let files = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        try run(["truncate", "-s", "64M"] + files)
        let remotes = try files.map { try NBDKit(["file", $0]) }
        try run([dmioNBDExecutable, "create", "--assume-clean"] + remotes.map(\.uri))
        return (files, remotes, remotes.map(\.uri))
    }

    /// Machine `name`'s own way to the legs' files: each write there takes
    /// a second, and is logged as it starts and as it ends.
    private func slowWays(_ fixture: MirrorFixture, to files: [String],
                          of name: String) throws -> (logs: [String], remotes: [NBDKit]) {
        let logs = files.indices.map { fixture.path("\(name)\($0).log") }
        let remotes = try files.indices.map {
            try NBDKit(["--filter=log", "--filter=delay", "file", files[$0], "logfile=\(logs[$0])", "delay-write=1"])
        }
        return (logs, remotes)
    }

    @Test func aSecondMachineIsRefusedThenTakesOverAndTheFirstWritesNothingMore() throws {
        let fixture = MirrorFixture()
        let (files, remotes, legs) = try remoteMirror(fixture)
        defer { withExtendedLifetime(remotes) {} }

        let first = try fixture.serve(legs + ["--control", fixture.path("a.ctl"), "--host-id", hostA, "--lease", "2"])
        let clientOfA = try fixture.connect()
        let written = try clientOfA.writeRegions(0..<4, seed: 1)

        // B while A renews its lease: refused, having watched the legs.
        let refused = try serveOnB(fixture, legs + ["--lease", "2", "--takeover"])
        refused.process.waitUntilExit()
        #expect(refused.process.terminationStatus == 1)
        #expect(refused.stderr().contains("renewed its lease within the last"), "\(refused.stderr())")

        // A's machine hangs past its lease: B takes over, and serves.
        kill(first.process.processIdentifier, SIGSTOP)
        let notYet = try serveOnB(fixture, legs + ["--lease", "2"])
        notYet.process.waitUntilExit()
        #expect(notYet.stderr().contains("--takeover takes the legs over"), "\(notYet.stderr())")
        let second = try serveOnB(fixture, legs + ["--lease", "2", "--takeover"])
        try second.waitUntilListening()
        let clientOfB = try NBDHandle()
        try clientOfB.connect(unixSocket: second.socket)
        try clientOfB.expectReadBack(written)
        let later = try clientOfB.writeRegions(4..<8, seed: 2)

        // A comes back: its lease ran out, it reads the legs, finds them B's,
        // and writes nothing more.
        kill(first.process.processIdentifier, SIGCONT)
        #expect(throws: NBDError.self) { try clientOfA.write(pattern(64 << 10, seed: 99), at: 0) }
        first.process.waitUntilExit()
        #expect(first.process.terminationStatus == 1)
        #expect(first.stderr().contains("another server took them over"), "\(first.stderr())")
        try clientOfB.expectReadBack(written.merging(later) { $1 })
        clientOfB.shutdown()
        #expect(second.stop() == 0)
        #expect(fixture.legsEqual(files[0], files[1]))
    }

    /// Two containers on one machine given one host id, each with a
    /// /run/lock of its own and its server pid 1: the second takes the
    /// legs for those of a server of this machine that is gone (the lock
    /// it holds tells nothing of the other's) and serves at once. Host,
    /// boot and pid are the same: the first must still see the second's
    /// claim as another server's, at its next renewal, and stop writing.
    @Test func aServerWithTheOwnersHostBootAndPidStillFencesIt() throws {
        let fixture = MirrorFixture()
        let (_, remotes, legs) = try remoteMirror(fixture)
        defer { withExtendedLifetime(remotes) {} }
        let first = try serve(on: "a", host: hostA, fixture, legs + ["--lease", "2"], asPID1: true)
        var containers = [first]
        defer { for server in containers where server.process.isRunning { _ = server.stop(signal: SIGKILL) } }
        try first.waitUntilListening()
        let clientOfA = try NBDHandle()
        try clientOfA.connect(unixSocket: first.socket)
        _ = try clientOfA.writeRegions(0..<4, seed: 1)

        let second = try serve(on: "a2", host: hostA, fixture, legs + ["--lease", "2"], asPID1: true)
        containers.append(second)
        try second.waitUntilListening()
        #expect(!second.stderr().contains("watching them"), "not watched: a server of this machine")
        // Renewals come every 0.4 s.
        try #require(first.exits(within: 10), "the first server still serves beside the second")
        #expect(first.process.terminationStatus == 1)
        #expect(first.stderr().contains("another server took them over"), "\(first.stderr())")
        #expect(throws: NBDError.self) { try clientOfA.write(pattern(64 << 10, seed: 99), at: 0) }
    }

    /// A renewal of the first server held on its way to the legs (their
    /// servers hang while it is in flight) lands after the second claimed
    /// them: it overwrites one superblock slot of the claim, which fills
    /// both; the first reads the legs after it, finds the claim in the
    /// other slot, and writes nothing more. The second, which waits out the
    /// first's lease after its claim, sees the late write, copies every
    /// region, and serves on.
    @Test func aRenewalThatLandsAfterATakeoverDoesNotLetTheFirstWriteAgain() throws {
        let fixture = MirrorFixture()
        let (files, remotes, legs) = try remoteMirror(fixture)
        let (logs, remotesOfA) = try slowWays(fixture, to: files, of: "a")
        defer { withExtendedLifetime(remotes + remotesOfA) {} }
        let first = try fixture.serve(remotesOfA.map(\.uri) + ["--control", fixture.path("a.ctl"), "--host-id", hostA,
                                                              "--lease", "2", "--remote-timeout", "60"])
        let clientOfA = try fixture.connect()
        let written = try clientOfA.writeRegions(0..<2, seed: 1)

        // A renewal on its way to both legs: their servers hang. B claims
        // the legs; A's renewal lands during B's wait.
        try #require(freezeDuringSuperblockWrite(remotesOfA, logs: logs), "no renewal caught on its way to both legs")
        let second = try serveOnB(fixture, legs + ["--lease", "2", "--takeover"])
        try #require(second.logs("the legs are claimed; waiting", within: 20))
        remotesOfA.forEach { $0.thaw() }

        // A's lease ran out long ago: it reads the legs after its renewal,
        // finds B's claim, and writes nothing more.
        #expect(throws: NBDError.self) { try clientOfA.write(pattern(64 << 10, seed: 99), at: 0) }
        first.process.waitUntilExit()
        #expect(first.process.terminationStatus == 1)
        #expect(first.stderr().contains("another server took them over"), "\(first.stderr())")

        try second.waitUntilListening()
        #expect(second.stderr().contains("wrote the legs as this one took them over"), "\(second.stderr())")
        let clientOfB = try NBDHandle()
        try clientOfB.connect(unixSocket: second.socket)
        try clientOfB.expectReadBack(written)
        let later = try clientOfB.writeRegions(2..<4, seed: 2)
        // B does not take A's late superblock for a takeover of its own.
        sleep(2)
        try clientOfB.expectReadBack(written.merging(later) { $1 })
        clientOfB.shutdown()
        #expect(second.stop() == 0, "\(second.stderr())")
        #expect(fixture.legsEqual(files[0], files[1]))
    }

    /// The first server comes back as the second takes the legs over:
    /// after the watch, before the claim (the servers of the second's legs
    /// hang meanwhile). Alive, it renews its lease and writes; or it stops
    /// cleanly. The second finds the legs moved, writes nothing, and refuses.
    @Test(arguments: [false, true]) func aServerBackDuringATakeoverKeepsTheLegs(stopsCleanly: Bool) throws {
        let fixture = MirrorFixture()
        let (files, remotes, legs) = try remoteMirror(fixture)
        // B's own way to the legs: each read waits 2 s first, so that none
        // after the watch's last is done before they hang.
        let remotesOfB = try files.map { try NBDKit(["--filter=delay", "file", $0, "rdelay=2"]) }
        defer { withExtendedLifetime(remotes + remotesOfB) {} }
        let first = try fixture.serve(legs + ["--control", fixture.path("a.ctl"), "--host-id", hostA, "--lease", "2"])
        let clientOfA = try fixture.connect()
        var written = try clientOfA.writeRegions(0..<2, seed: 1)
        if stopsCleanly { clientOfA.shutdown() }

        kill(first.process.processIdentifier, SIGSTOP)
        let second = try serveOnB(fixture, remotesOfB.map(\.uri) + ["--lease", "2", "--takeover"])
        try #require(second.logs("taking the legs over", within: 30))
        remotesOfB.forEach { $0.freeze(limit: 60) }
        // Held until it runs again.
        if stopsCleanly { kill(first.process.processIdentifier, SIGTERM) }
        kill(first.process.processIdentifier, SIGCONT)
        if stopsCleanly {
            try #require(first.exits(within: 30), "A did not stop")
            #expect(first.process.terminationStatus == 0, "\(first.stderr())")
        } else {
            // Answered once A renewed its lease.
            written.merge(try clientOfA.writeRegions(2..<4, seed: 2)) { $1 }
        }
        remotesOfB.forEach { $0.thaw() }

        try #require(second.exits(within: 30), "B did not refuse")
        #expect(second.process.terminationStatus == 1)
        let said = second.stderr()
        let why = stopsCleanly ? "stopped cleanly while this server took them over" : "wrote to the legs while this one"
        #expect(said.contains(why), "\(said)")
        #expect(!said.contains("the legs are claimed"), "nothing written: \(said)")
        if !stopsCleanly {
            written.merge(try clientOfA.writeRegions(4..<6, seed: 3)) { $1 }
            try clientOfA.expectReadBack(written)
            clientOfA.shutdown()
            #expect(first.stop() == 0, "\(first.stderr())")
        }
        #expect(fixture.legsEqual(files[0], files[1]))
    }

    /// Two standbys take the legs over at once: B's claim is held on its
    /// way (the servers of its legs hang) while C watches and claims, and
    /// lands during C's wait. C, finding its claim overwritten, writes
    /// nothing more and refuses; B serves; the first, thawed, stops.
    @Test func ofTwoStandbysTakingOverAtOnceTheLastClaimServes() throws {
        let fixture = MirrorFixture()
        let (files, remotes, legs) = try remoteMirror(fixture)
        let (logs, remotesOfB) = try slowWays(fixture, to: files, of: "b")
        defer { withExtendedLifetime(remotes + remotesOfB) {} }
        let first = try fixture.serve(legs + ["--control", fixture.path("a.ctl"), "--host-id", hostA, "--lease", "2"])
        let written = try fixture.connect().writeRegions(0..<2, seed: 1)

        kill(first.process.processIdentifier, SIGSTOP)
        let second = try serveOnB(fixture, remotesOfB.map(\.uri) + ["--lease", "2", "--takeover", "--remote-timeout", "60"])
        try #require(freezeDuringSuperblockWrite(remotesOfB, logs: logs), "B's claim not caught on its way to both legs")
        let third = try serve(on: "c", host: hostC, fixture, legs + ["--lease", "2", "--takeover"])
        try #require(third.logs("the legs are claimed; waiting", within: 20))
        remotesOfB.forEach { $0.thaw() }

        try #require(third.exits(within: 30), "C did not refuse")
        #expect(third.process.terminationStatus == 1)
        let said = third.stderr()
        #expect(said.contains("wrote over this server's claim"), "\(said)")
        try second.waitUntilListening()
        let client = try NBDHandle()
        try client.connect(unixSocket: second.socket)
        try client.expectReadBack(written)
        kill(first.process.processIdentifier, SIGCONT)
        try #require(first.exits(within: 30), "A did not stop")
        #expect(first.process.terminationStatus == 1)
        client.shutdown()
        #expect(second.stop() == 0, "\(second.stderr())")
        #expect(fixture.legsEqual(files[0], files[1]))
    }

    /// Freezes `servers` while each has a superblock write (a renewal or a
    /// claim: offset 0 or 4 KiB) begun and not ended, as their logs say;
    /// false if none was caught so.
    private func freezeDuringSuperblockWrite(_ servers: [NBDKit], logs: [String]) -> Bool {
        func superblockWritesInFlight(_ log: String) -> Set<NBDKitLog.Request> {
            Set(NBDKitLog(path: log).requests("Write").filter { $0.done == nil && ($0.offset == 0 || $0.offset == 4096) })
        }
        for _ in 0..<20 {
            let deadline = Date().addingTimeInterval(10)
            while logs.contains(where: { superblockWritesInFlight($0).isEmpty }) && Date() < deadline { usleep(2_000) }
            let caught = logs.map(superblockWritesInFlight)
            servers.forEach { $0.freeze(limit: 60) }
            // Still on their way once frozen: else thaw, and catch the next.
            if zip(logs, caught).allSatisfy({ !$1.isEmpty && $1.isSubset(of: superblockWritesInFlight($0)) }) { return true }
            servers.forEach { $0.thaw() }
        }
        return false
    }

    /// A mirror stopped cleanly is free: another machine starts it without
    /// watching.
    @Test func aCleanStopLeavesTheLegsFreeForAnotherMachine() throws {
        let fixture = MirrorFixture()
        let (_, remotes, legs) = try remoteMirror(fixture)
        defer { withExtendedLifetime(remotes) {} }
        let first = try fixture.serve(legs + ["--host-id", hostA, "--lease", "2"])
        #expect(first.stop() == 0)
        let second = try serveOnB(fixture, legs + ["--lease", "2"])
        try second.waitUntilListening()
        #expect(second.stop() == 0)
        #expect(!second.stderr().contains("watching them"), "no watch: the legs were nobody's")
    }
}
