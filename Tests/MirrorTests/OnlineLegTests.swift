import Foundation
import LibNBD
import Mirror
import TestSupport
import Testing

/// add-leg, remove-leg and replace-leg while clients read and write: what
/// the legs hold afterwards, and what a restart with each command line does.
@Suite(.serialized) struct OnlineLegTests {
    /// A new mirror, in sync, of `count` sparse leg files of 64 MiB.
    private func mirror(_ fixture: MirrorFixture, legs count: Int) throws -> [String] {
        let legs = (0..<count).map { fixture.path("leg\($0).img") }
        try run(["truncate", "-s", "64M"] + legs)
        try run([dmioNBDExecutable, "create", "--assume-clean"] + legs)
        return legs
    }

    /// fio writing and verifying over the whole mirror, two jobs on halves of their own.
    private func fioVerifying(_ fixture: MirrorFixture, seconds: Int) throws -> Process {
        let fio = Process()
        fio.executableURL = URL(fileURLWithPath: "/usr/bin/fio")
        fio.arguments = ["--name=verify", "--ioengine=nbd", "--uri=\(fixture.uri)", "--rw=randwrite", "--bs=4k-128k",
                         "--iodepth=8", "--size=31M", "--offset_increment=31M", "--numjobs=2", "--runtime=\(seconds)",
                         "--time_based", "--verify=crc32c", "--verify_state_save=0", "--verify_backlog=128", "--randrepeat=0", "--output=/dev/null"]
        try fio.run()
        return fio
    }

    @Test func aLegAddedUnderLoadEndsEqualToTheOthers() throws {
        let fixture = MirrorFixture()
        var legs = try mirror(fixture, legs: 2)
        let server = try fixture.serve(legs)
        let fio = try fioVerifying(fixture, seconds: 5)
        usleep(1_000_000)
        let added = fixture.path("leg2.img")
        try run(["truncate", "-s", "64M", added])
        let grown = try fixture.control(["add-leg", added])
        #expect(grown.legs.count == 3 && grown.legs[2].device == added)
        #expect(grown.state(2) == .rebuilding || grown.state(2) == .inSync)
        fio.waitUntilExit()
        #expect(fio.terminationStatus == 0, "fio's verify")
        try fixture.waitFor("the new leg in sync") { $0.allInSync }
        #expect(server.stop() == 0)
        legs.append(added)
        #expect(fixture.legsEqual(legs[0], legs[1]) && fixture.legsEqual(legs[0], legs[2]))
        // The legs as they were is not the mirror any more; as they are, it is.
        let refused = try fixture.serveRefused(Array(legs.prefix(2)))
        #expect(refused.contains("has 3 legs, 2 given; its legs, in order: \(legs.joined(separator: " "))"), "\(refused)")
        let again = try fixture.serve(legs)
        #expect(try fixture.status().allInSync)
        #expect(again.stop() == 0)
    }

    @Test func aRemovedLegIsNeverServedAsOneOfTheMirrorsLegsAgain() throws {
        let fixture = MirrorFixture()
        let legs = try mirror(fixture, legs: 3)
        let server = try fixture.serve(legs)
        let handle = try fixture.connect()
        let written = try handle.writeRegions(0..<8, seed: 21)
        let watcher = try EventTests.Watcher(["--now", "--socket", fixture.socket])
        watcher.waitFor("exists -", timeout: 10)
        let shrunk = try fixture.control(["remove-leg", "0"])
        #expect(shrunk.legs.map(\.device) == [legs[1], legs[2]])
        watcher.waitFor("destroy leg", "leg:0", "device:\(legs[0])")
        watcher.waitFor("change leg", "leg:0", "moved-from:1", "device:\(legs[1])")
        // The legs that moved take writes at their new place.
        let later = try handle.writeRegions(8..<12, seed: 22)
        try handle.expectReadBack(written.merging(later) { $1 })
        let examined = try run([dmioNBDExecutable, "examine", legs[0], "--json"])
        #expect(examined.contains("\"removed\":true"), "\(examined)")
        do {
            try fixture.control(["remove-leg", "1"])
            Issue.record("a mirror of two legs lost one")
        } catch let failed as CommandFailed {
            #expect(failed.output.contains("a mirror keeps two legs at least"), "\(failed.output)")
        }
        handle.shutdown()
        #expect(server.stop() == 0)
        let refused = try fixture.serveRefused(legs)
        #expect(refused.contains("\(legs[0]) was removed from mirror") && refused.contains("its legs, in order: \(legs[1]) \(legs[2])"),
                "\(refused)")
        // While the mirror runs, the removed leg can be wiped for another use.
        let again = try fixture.serve([legs[1], legs[2]])
        try fixture.connect().expectReadBack(written.merging(later) { $1 })
        #expect(try run([dmioNBDExecutable, "wipe", legs[0]]).contains("removed from mirror"))
        #expect(again.stop() == 0)
        #expect(fixture.legsEqual(legs[1], legs[2]))
    }

    /// md's --replace: the old leg is read and written until the new one
    /// has its copy. Here leg 0 is failed during the copy, so that the old
    /// leg 1 is the only one reads can come from.
    @Test func aHealthyLegBeingReplacedServesReadsUntilTheCopyEnds() throws {
        let fixture = MirrorFixture()
        let legs = try mirror(fixture, legs: 2)
        let server = try fixture.serve(legs + ["--resync-rate", "12M"])
        let handle = try fixture.connect()
        let written = try handle.writeRegions(0..<16, seed: 5)
        let replacement = fixture.path("new.img")
        try run(["truncate", "-s", "64M", replacement])
        let replacing = try fixture.control(["replace-leg", "1", replacement])
        #expect(replacing.legs.map(\.device) == legs + [replacement])
        #expect(replacing.state(1) == .inSync && replacing.state(2) == .rebuilding && replacing.legs[2].replaces == 1)
        try fixture.control(["fail-leg", "0"])
        try handle.expectReadBack(written)
        let during = try fixture.status()
        #expect(during.resync.active && during.state(1) == .inSync && during.legs[1].device == legs[1], "\(during)")
        let later = try handle.writeRegions(16..<20, seed: 6)
        let done = try fixture.waitFor("the replacement in sync", timeout: 30) { $0.legs.count == 2 && !$0.resync.active }
        #expect(done.legs.map(\.device) == [legs[0], replacement])
        #expect(done.state(0) == .degraded && done.state(1) == .inSync)
        try handle.expectReadBack(written.merging(later) { $1 })
        try fixture.control(["readd-leg", "0"])
        try fixture.waitFor("leg 0 back") { $0.allInSync }
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs[0], replacement))
        #expect(try run([dmioNBDExecutable, "examine", legs[1], "--json"]).contains("\"removed\":true"))
        let refused = try fixture.serveRefused(legs)
        #expect(refused.contains("\(legs[1]) was removed from mirror"), "\(refused)")
    }

    /// A leg that is out is replaced at once, in its place: an old command
    /// line is refused naming the leg now there.
    @Test func aDegradedLegIsReplacedInPlace() throws {
        let fixture = MirrorFixture()
        let legs = try mirror(fixture, legs: 2)
        let server = try fixture.serve(legs)
        try fixture.control(["fail-leg", "1"])
        let replacement = fixture.path("new.img")
        try run(["truncate", "-s", "64M", replacement])
        let replaced = try fixture.control(["replace-leg", "1", replacement])
        #expect(replaced.legs.map(\.device) == [legs[0], replacement] && replaced.legs[1].replaces == nil)
        try fixture.waitFor("the new leg in sync") { $0.allInSync }
        #expect(server.stop() == 0)
        let old = try fixture.serveRefused(legs)
        #expect(old.contains("\(legs[1]) was replaced in mirror") && old.contains("leg 1 is now \(replacement)"), "\(old)")
    }

    /// A leg that was out while the legs moved keeps a superblock of the old
    /// shape: the mirror still starts with it in its new place, and it is
    /// re-added with a copy of only what it missed.
    @Test func aLegThatWasOutWhileTheLegsMovedComesBackInItsNewPlace() throws {
        let fixture = MirrorFixture()
        let legs = try mirror(fixture, legs: 3)
        var server = try fixture.serve(legs)
        let handle = try fixture.connect()
        let before = try handle.writeRegions(0..<4, seed: 31)
        try fixture.control(["fail-leg", "2"])
        try fixture.control(["remove-leg", "0"])
        let missed = try handle.writeRegions(4..<6, seed: 32)
        handle.shutdown()
        #expect(server.stop() == 0)
        server = try fixture.serve([legs[1], legs[2]])
        let restarted = try fixture.status()
        #expect(restarted.legs.map(\.device) == [legs[1], legs[2]] && restarted.state(1) == .degraded)
        try fixture.control(["readd-leg", "1"])
        let back = try fixture.waitFor("leg 1 back") { $0.allInSync }
        #expect(back.resync.regionsTotal < back.regions, "only what it missed: \(back.resync)")
        try fixture.connect().expectReadBack(before.merging(missed) { $1 })
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs[1], legs[2]))
    }
}
