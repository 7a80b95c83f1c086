import Foundation
import LibNBD
import Mirror
import TestSupport
import Testing

/// `dmio-nbd check` and `dmio-nbd repair`: copies made to differ by writing
/// to a leg's file behind the server's back, a leg whose reads fail behind
/// nbdkit's error filter, and a scrub while fio writes and verifies.
@Suite(.serialized) struct ScrubTests {
    /// `dmio-nbd COMMAND --wait`: its exit status and the mirror it printed.
    private func scrub(_ fixture: MirrorFixture, _ command: String) throws -> (exit: Int32, scrub: MirrorStatus.Scrub) {
        let (exit, output): (Int32, String)
        do {
            (exit, output) = (0, try run([dmioNBDExecutable, command, "--wait", "--socket", fixture.socket, "--json"]))
        } catch let failed as CommandFailed {
            (exit, output) = (failed.status, failed.output)
        }
        let json = output.split(separator: "\n").last.map(String.init) ?? ""
        let printed = try JSONDecoder().decode(MirrorFixture.StatusOutput.self, from: Data(json.utf8))
        return (exit, try #require(printed.mirrors.first?.mirror.scrub, "\(output)"))
    }

    /// Writes `byte` into `leg`'s file at byte `at` of the mirror's data.
    private func poke(_ leg: String, at offset: Int, _ byte: UInt8) throws {
        let handle = try #require(FileHandle(forUpdatingAtPath: leg))
        try handle.seek(toOffset: UInt64(1 << 20 + offset))
        try handle.write(contentsOf: [byte])
        try handle.close()
    }

    /// `count` leg files of `size`, made a mirror in sync.
    private func legsInSync(_ fixture: MirrorFixture, count: Int = 2, size: String = "64M") throws -> [String] {
        let legs = (0..<count).map { fixture.path("leg\($0).img") }
        try run(["truncate", "-s", size] + legs)
        try run([dmioNBDExecutable, "create", "--assume-clean"] + legs)
        return legs
    }

    /// A mirror in sync of `count` leg files with 16 regions written.
    private func writtenMirror(_ fixture: MirrorFixture, legs count: Int) throws -> (legs: [String], server: ServeProcess,
                                                                                  written: [Int: [UInt8]]) {
        let legs = try legsInSync(fixture, count: count)
        let server = try fixture.serve(legs)
        let handle = try fixture.connect()
        let written = try handle.writeRegions(0..<16, seed: 9)
        try handle.flush()
        handle.shutdown()
        return (legs, server, written)
    }

    @Test func checkFindsOneChangedByteAndRepairRewritesItFromTheFirstLeg() throws {
        let fixture = MirrorFixture()
        let (legs, server, written) = try writtenMirror(fixture, legs: 2)
        let clean = try scrub(fixture, "check")
        #expect(clean.exit == 0 && clean.scrub.mismatchedRegions == 0 && clean.scrub.result == "done", "\(clean)")
        #expect(clean.scrub.regionsDone == clean.scrub.regionsTotal)

        try poke(legs[1], at: 5 * testRegionBytes + 100, 0xA5)
        let checked = try scrub(fixture, "check")
        #expect(checked.exit == 2)
        #expect(checked.scrub.mismatchedRegions == 1 && checked.scrub.mismatchedBytes == 1, "\(checked.scrub)")
        #expect(checked.scrub.repairedRegions == 0)
        #expect(!fixture.legsEqual(legs[0], legs[1]), "a check must not rewrite")

        let repaired = try scrub(fixture, "repair")
        #expect(repaired.exit == 0, "\(repaired.scrub)")
        #expect(repaired.scrub.mismatchedRegions == 1 && repaired.scrub.repairedRegions == 1)
        #expect(fixture.legsEqual(legs[0], legs[1]))
        try fixture.connect().expectReadBack(written)
        #expect(try scrub(fixture, "check").exit == 0)
        #expect(server.stop() == 0)
        let log = server.stderr()
        #expect(log.contains("region 5 (offset \(5 * testRegionBytes)): 1 bytes differ between legs 0 and 1; two legs have no majority"),
                "\(log)")
    }

    @Test func withThreeLegsTheMajorityWinsAndACopyWithoutOneIsLeftAlone() throws {
        let fixture = MirrorFixture()
        let (legs, server, written) = try writtenMirror(fixture, legs: 3)
        // The first leg outvoted (with two legs its copy would win), and a
        // region where each leg holds a copy of its own.
        try poke(legs[0], at: 2 * testRegionBytes + 7, 0x11)
        try poke(legs[0], at: 4 * testRegionBytes, 0x22)
        try poke(legs[1], at: 4 * testRegionBytes, 0x33)
        let watcher = try EventTests.Watcher(["--now", "--socket", fixture.socket])
        watcher.waitFor("exists -", timeout: 10)
        let repaired = try scrub(fixture, "repair")
        #expect(repaired.exit == 2, "a region left without a majority")
        #expect(repaired.scrub.mismatchedRegions == 2 && repaired.scrub.repairedRegions == 1, "\(repaired.scrub)")
        #expect(repaired.scrub.unresolvedRegions == 1)
        watcher.waitFor("scrub mismatch", "region:2", "vote:majority", "winner:1", "outvoted:0", "repaired:yes")
        watcher.waitFor("scrub mismatch", "region:4", "vote:none", "repaired:no")
        watcher.waitFor("scrub finished", "action:repair", "mismatched-regions:2", "unresolved-regions:1")
        #expect(fixture.legsEqual(legs[1], legs[2]) == false, "region 4 is not guessed")
        // Region 2 is the majority's again everywhere; region 4 kept each copy.
        let regionAt = { (leg: String, region: Int) in
            Array(try Data(contentsOf: URL(fileURLWithPath: leg))[(1 << 20) + region * testRegionBytes ..< (1 << 20) + (region + 1) * testRegionBytes])
        }
        #expect(try regionAt(legs[0], 2) == regionAt(legs[2], 2))
        #expect(try regionAt(legs[0], 4) != regionAt(legs[2], 4))
        #expect(try regionAt(legs[1], 4) != regionAt(legs[2], 4))
        try fixture.connect().expectReadBack(written.filter { $0.key != 4 })
        #expect(server.stop() == 0)
        #expect(server.stderr().contains("leg 0 outvoted by the majority that holds leg 1's copy: rewritten"))
    }

    /// Two jobs, each on a half of its own: writes in flight at once to the
    /// same bytes (which no file system issues) may reach the legs in
    /// different orders, and a check would rightly count them, as md's does.
    @Test func aScrubWhileFioWritesAndVerifiesFindsNothing() throws {
        let fixture = MirrorFixture()
        let legs = try legsInSync(fixture)
        let server = try fixture.serve(legs)
        let fio = Process()
        fio.executableURL = URL(fileURLWithPath: "/usr/bin/fio")
        fio.arguments = ["--name=verify", "--ioengine=nbd", "--uri=\(fixture.uri)", "--rw=randwrite", "--bs=4k-256k",
                         "--iodepth=16", "--size=31M", "--offset_increment=31M", "--runtime=6", "--time_based",
                         "--verify=crc32c", "--verify_state_save=0", "--verify_backlog=256", "--numjobs=2", "--randrepeat=0",
                         "--output=/dev/null"]
        try fio.run()
        var checks = 0
        while fio.isRunning {
            let checked = try scrub(fixture, "check")
            #expect(checked.scrub.mismatchedRegions == 0 && checked.exit == 0, "\(checked.scrub)")
            checks += 1
        }
        fio.waitUntilExit()
        #expect(fio.terminationStatus == 0, "fio's verify")
        #expect(checks >= 3)
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs[0], legs[1]))
    }

    @Test func aLegThatCannotReadIsRewrittenFromTheOtherAndStaysInSync() throws {
        let fixture = MirrorFixture()
        let leg0 = fixture.path("leg0.img"), remoteFile = fixture.path("leg1.img"), trigger = fixture.path("fail-reads")
        try run(["truncate", "-s", "64M", leg0, remoteFile])
        let remote = try NBDKit(["--filter=error", "file", remoteFile, "error-pread=EIO", "error-pread-rate=100%",
                                 "error-pread-file=\(trigger)"])
        try run([dmioNBDExecutable, "create", "--assume-clean", leg0, remote.uri])
        // Reads from leg 0 only: no client read meets the error.
        let server = try fixture.serve([leg0, remote.uri, "--read-policy", "first"])
        let handle = try fixture.connect()
        let written = try handle.writeRegions(0..<16, seed: 4)
        try handle.flush()
        // A bad copy that the read errors hide: the rewrite must replace it.
        try poke(remoteFile, at: 3 * testRegionBytes + 1, 0xEE)
        _ = FileManager.default.createFile(atPath: trigger, contents: nil)
        let checked = try scrub(fixture, "check")
        #expect(checked.exit == 0, "\(checked.scrub)")
        #expect(checked.scrub.readErrorsRepaired == checked.scrub.regionsTotal, "\(checked.scrub)")
        #expect(checked.scrub.mismatchedRegions == 0)
        let status = try fixture.status()
        #expect(status.state(1) == .inSync)
        #expect(status.legs[1].readErrors == checked.scrub.regionsTotal)
        try FileManager.default.removeItem(atPath: trigger)
        #expect(fixture.legsEqual(leg0, remoteFile))
        try handle.expectReadBack(written)
        handle.shutdown()
        #expect(server.stop() == 0)
    }

    /// `--resync-rate` holds from one pass to the next: a check started
    /// as the last one ends waits until that one's last run has had its
    /// time at the limit, rather than starting with a burst. Each leg holds
    /// 4 MiB of data: a check is two runs of 2 MiB (two legs' copies of a
    /// run fill about 4 MiB).
    @Test func aCheckRightAfterAnotherKeepsToTheRateLimit() throws {
        let fixture = MirrorFixture()
        let legs = try legsInSync(fixture, size: "5M")
        let server = try fixture.serve(legs + ["--resync-rate", "1M"])
        let start = ContinuousClock.now
        let first = try scrub(fixture, "check")
        let second = try scrub(fixture, "check")
        let took = ContinuousClock.now - start
        #expect(first.exit == 0 && second.exit == 0)
        #expect(first.scrub.bytesChecked == 4 << 20 && second.scrub.bytesChecked == 4 << 20, "\(second.scrub)")
        // Four runs of 2 MiB at 1 MiB a second: the last starts 6 s after
        // the first (4 s if the second check's first run went at once).
        #expect(took >= .seconds(5.5), "two checks of 4 MiB each at 1M took \(took)")
        #expect(server.stop() == 0)
    }

    @Test func aCheckIsRefusedWithOneLegInSyncAndCanBeCancelled() throws {
        let fixture = MirrorFixture()
        let legs = try legsInSync(fixture, size: "256M")
        let server = try fixture.serve(legs + ["--resync-rate", "8M"])
        let started = try fixture.control(["check"])
        #expect(started.scrub?.active == true)
        do {
            try fixture.control(["repair"])
            Issue.record("a repair started during a check")
        } catch let failed as CommandFailed {
            #expect(failed.output.contains("a check is under way already"), "\(failed.output)")
        }
        try fixture.waitFor("the check under way") { ($0.scrub?.regionsDone ?? 0) > 0 }
        try fixture.control(["check", "--cancel"])
        let stopped = try fixture.waitFor("the check stopped") { $0.scrub?.active == false }
        #expect(stopped.scrub?.result == "stopped")
        #expect(stopped.scrub?.regionsDone ?? 0 < stopped.scrub?.regionsTotal ?? 0)
        try fixture.control(["fail-leg", "1"])
        do {
            try fixture.control(["check"])
            Issue.record("a check with one leg in sync was not refused")
        } catch let failed as CommandFailed {
            #expect(failed.output.contains("nothing to compare"), "\(failed.output)")
        }
        #expect(server.stop() == 0)
    }

    /// Three legs, one of which cannot be read: the two copies read differ,
    /// and the third might be the one that agrees with either. Nothing is
    /// rewritten, the unread leg least of all, until it can be read again.
    @Test func aReadErrorAndTwoCopiesThatDifferMakeNoMajority() throws {
        let fixture = MirrorFixture()
        let leg0 = fixture.path("leg0.img"), leg1 = fixture.path("leg1.img")
        let remoteFile = fixture.path("leg2.img"), trigger = fixture.path("fail-reads")
        try run(["truncate", "-s", "64M", leg0, leg1, remoteFile])
        let remote = try NBDKit(["--filter=error", "file", remoteFile, "error-pread=EIO", "error-pread-rate=100%",
                                 "error-pread-file=\(trigger)"])
        try run([dmioNBDExecutable, "create", "--assume-clean", leg0, leg1, remote.uri])
        let server = try fixture.serve([leg0, leg1, remote.uri, "--read-policy", "first"])
        let handle = try fixture.connect()
        let written = try handle.writeRegions(0..<8, seed: 8)
        try handle.flush()
        try poke(leg0, at: 2 * testRegionBytes + 9, 0x77)
        _ = FileManager.default.createFile(atPath: trigger, contents: nil)
        for command in ["check", "repair"] {
            let scrubbed = try scrub(fixture, command)
            #expect(scrubbed.exit == 2, "\(command): \(scrubbed.scrub)")
            #expect(scrubbed.scrub.unresolvedRegions == 1 && scrubbed.scrub.repairedRegions == 0, "\(command): \(scrubbed.scrub)")
            // Every other region: leg 2's copy rewritten from the two that agree.
            #expect(scrubbed.scrub.readErrorsRepaired == scrubbed.scrub.regionsTotal - 1)
            #expect(scrubbed.scrub.readErrorsLeft == 1)
        }
        #expect(!fixture.legsEqual(leg0, leg1) && fixture.legsEqual(leg1, remoteFile), "leg 2 keeps its good copy")
        try FileManager.default.removeItem(atPath: trigger)
        let repaired = try scrub(fixture, "repair")
        #expect(repaired.exit == 0 && repaired.scrub.repairedRegions == 1, "\(repaired.scrub)")
        #expect(fixture.legsEqual(leg0, leg1) && fixture.legsEqual(leg0, remoteFile))
        try handle.expectReadBack(written)
        handle.shutdown()
        #expect(server.stop() == 0)
    }
}
