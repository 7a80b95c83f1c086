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
        // A's own way to the legs: each write there takes a second, and is
        // logged as it starts and as it ends.
        let logs = files.indices.map { fixture.path("a\($0).log") }
        let remotesOfA = try files.indices.map {
            try NBDKit(["--filter=log", "--filter=delay", "file", files[$0], "logfile=\(logs[$0])", "delay-write=1"])
        }
        defer { withExtendedLifetime(remotes + remotesOfA) {} }
        let first = try fixture.serve(remotesOfA.map(\.uri) + ["--control", fixture.path("a.ctl"), "--host-id", hostA,
                                                              "--lease", "2", "--remote-timeout", "60"])
        let clientOfA = try fixture.connect()
        let written = try clientOfA.writeRegions(0..<2, seed: 1)

        // A renewal on its way to both legs: their servers hang. B claims
        // the legs; A's renewal lands during B's wait.
        try #require(freezeDuringRenewal(remotesOfA, logs: logs), "no renewal caught on its way to both legs")
        let second = try serveOnB(fixture, legs + ["--lease", "2", "--takeover"])
        let deadline = Date().addingTimeInterval(20)
        while !second.stderr().contains("the legs are claimed; waiting") && Date() < deadline { usleep(10_000) }
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

    /// Freezes `servers` while each has a superblock write (a renewal:
    /// offset 0 or 4 KiB) begun and not ended, as their logs say; false
    /// if none was caught so.
    private func freezeDuringRenewal(_ servers: [NBDKit], logs: [String]) -> Bool {
        func renewalsInFlight(_ log: String) -> Set<Substring> {
            let lines = ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n")
            var open = Set<Substring>()
            for line in lines {
                guard let id = line.split(separator: " ").first(where: { $0.hasPrefix("id=") }) else { continue }
                if line.contains(" Write ") && (line.contains("offset=0x0 ") || line.contains("offset=0x1000 ")) {
                    open.insert(id)
                } else if line.contains("...Write ") {
                    open.remove(id)
                }
            }
            return open
        }
        for _ in 0..<20 {
            let deadline = Date().addingTimeInterval(10)
            while logs.contains(where: { renewalsInFlight($0).isEmpty }) && Date() < deadline { usleep(2_000) }
            let caught = logs.map(renewalsInFlight)
            servers.forEach { $0.freeze(limit: 60) }
            // Still on their way once frozen: else thaw, and catch the next.
            if zip(logs, caught).allSatisfy({ !$1.isEmpty && $1.isSubset(of: renewalsInFlight($0)) }) { return true }
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
