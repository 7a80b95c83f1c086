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

    /// `dmio-nbd serve` as the server on machine B.
    private func serveOnB(_ fixture: MirrorFixture, _ arguments: [String]) throws -> ServeProcess {
        let socket = fixture.path("b.sock")
        return try ServeProcess(arguments: arguments + ["--socket", socket, "--control", fixture.path("b.ctl"),
                                                        "--host-id", hostB],
                                socket: socket,
                                launcher: ["/usr/bin/unshare", "--mount", "--propagation", "private", "sh", "-c",
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
