import BlockTargets
import Foundation
import LibNBD
import Mirror
import TestSupport
import Testing

/// The mirror under real faults, driven as a user drives it: `dmio-nbd
/// serve` with legs, libnbd writing and reading, `dmio-nbd status` and the
/// leg commands. Each checks the bytes the client reads, the legs' states,
/// and that the legs hold equal data once in sync.
@Suite(.serialized) struct FaultTests {
    static let legSize = "64M"

    /// Re-adds leg 1, waits for the resync, stops the server cleanly and
    /// checks that the legs hold the same data.
    @discardableResult
    private func readdAndCompare(_ fixture: MirrorFixture, _ server: ServeProcess, _ handle: NBDHandle,
                                 _ leg0: String, _ leg1: String, timeout: Double = 10) throws -> MirrorStatus {
        try fixture.control(["readd-leg", "1"])
        let status = try fixture.waitFor("leg 1 in sync", timeout: timeout) { $0.allInSync }
        stopAndCompare(fixture, server, handle, leg0, leg1)
        return status
    }

    /// Lets the client go, stops the server cleanly and checks that the two
    /// legs hold the same data.
    private func stopAndCompare(_ fixture: MirrorFixture, _ server: ServeProcess, _ handle: NBDHandle,
                                _ leg0: String, _ leg1: String) {
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(leg0, leg1))
    }

    @Test func aLegThatFillsUpIsDegradedAndTheClientLosesNothing() throws {
        let fixture = MirrorFixture()
        let small = try fixture.smallTmpfs("small", size: "4M")
        let legs = [fixture.path("leg0.img"), small + "/leg1.img"]
        let server = try fixture.serve(legs + ["--create", Self.legSize])
        let handle = try fixture.connect()
        // 16 regions of 64 KiB each is 1 MiB; the writes go on well past 4 MiB.
        var written: [Int: [UInt8]] = [:]
        for round in 0..<7 {
            written.merge(try handle.writeRegions((round * 16)..<(round * 16 + 16), seed: UInt8(round))) { $1 }
            for region in (round * 16)..<(round * 16 + 16) {
                let more = pattern(448 << 10, seed: UInt8(region & 0xFF))
                try handle.write(more, at: UInt64(region * testRegionBytes + (64 << 10)))
            }
        }
        let status = try fixture.status()
        #expect(status.state(0) == .inSync)
        #expect(status.state(1) == .degraded)
        #expect(status.legs[1].error?.contains("ENOSPC") == true)
        #expect(status.legs[1].why == "write: ENOSPC")
        #expect(status.dmsetupLine.hasSuffix(" AD"))
        try handle.expectReadBack(written)

        // Room again: the re-added leg gets the regions written while it was out.
        try fixture.resize(tmpfs: small, to: "80M")
        try readdAndCompare(fixture, server, handle, legs[0], legs[1])
    }

    @Test func aLegBehindNBDKitErrorsIsDegradedOnWritesThenServesAfterReadd() throws {
        let fixture = MirrorFixture()
        let trigger = fixture.path("fail-writes")
        let remoteFile = fixture.path("leg1.img")
        try run(["truncate", "-s", Self.legSize, remoteFile])
        let remote = try NBDKit(["--filter=error", "file", remoteFile, "error-pwrite=EIO",
                                 "error-pwrite-rate=100%", "error-pwrite-file=\(trigger)"])
        let leg0 = fixture.path("leg0.img")
        try run(["truncate", "-s", Self.legSize, leg0])
        try run([dmioNBDExecutable, "create", leg0, remote.uri])
        let server = try fixture.serve([leg0, remote.uri])
        try fixture.waitFor("the first copy") { $0.allInSync }
        let handle = try fixture.connect()

        var written = try handle.writeRegions(0..<4, seed: 1)
        #expect(FileManager.default.createFile(atPath: trigger, contents: nil))
        written.merge(try handle.writeRegions(4..<12, seed: 2)) { $1 }
        var status = try fixture.status()
        #expect(status.state(1) == .degraded)
        #expect(status.legs[1].error?.contains("EIO") == true)
        try handle.expectReadBack(written)

        try FileManager.default.removeItem(atPath: trigger)
        status = try readdAndCompare(fixture, server, handle, leg0, remoteFile)
        #expect(status.resync.regionsTotal >= 8, "\(status.resync)")
    }

    @Test func aFirstLegThatFailsReadsIsDegradedAndReadsComeFromTheNext() throws {
        let fixture = MirrorFixture()
        let trigger = fixture.path("fail-reads")
        let remoteFile = fixture.path("leg0.img")
        let leg1 = fixture.path("leg1.img")
        try run(["truncate", "-s", Self.legSize, remoteFile, leg1])
        let remote = try NBDKit(["--filter=error", "file", remoteFile, "error-pread=EIO",
                                 "error-pread-rate=100%", "error-pread-file=\(trigger)"])
        try run([dmioNBDExecutable, "create", remote.uri, leg1])
        let server = try fixture.serve([remote.uri, leg1])
        try fixture.waitFor("the first copy") { $0.allInSync }
        let handle = try fixture.connect()
        let written = try handle.writeRegions(0..<6, seed: 3)
        #expect(FileManager.default.createFile(atPath: trigger, contents: nil))
        try handle.expectReadBack(written)
        let status = try fixture.status()
        #expect(status.state(0) == .degraded)
        #expect(status.legs[0].readErrors >= 1)
        #expect(status.dmsetupLine.hasSuffix(" RA"))
        handle.shutdown()
        #expect(server.stop() == 0)
    }

    @Test func aRemoteLegWhoseServerIsKilledMidWriteIsDegradedAndComesBack() throws {
        let fixture = MirrorFixture()
        var legs = try RemoteLegMirror(fixture)
        // The operator re-adds it: the server does not try it again by itself.
        let server = try fixture.serve([legs.leg0, legs.remote.uri, "--reconnect-interval", "0"])
        try fixture.waitFor("the first copy") { $0.allInSync }
        let handle = try fixture.connect()

        // Writes in flight when the leg's server dies.
        final class Written: @unchecked Sendable { var regions: [Int: [UInt8]] = [:] }
        let box = Written()
        let writer = Thread {
            box.regions = (try? handle.writeRegions(0..<40, seed: 4)) ?? [:]
        }
        writer.start()
        usleep(20_000)
        legs.remote.kill()
        while !writer.isFinished { usleep(10_000) }
        let written = box.regions
        #expect(written.count == 40, "every write succeeds on the surviving leg")
        #expect(try fixture.status().state(1) == .degraded)
        try handle.expectReadBack(written)

        try legs.restartRemote()
        try readdAndCompare(fixture, server, handle, legs.leg0, legs.remoteFile)
    }

    @Test func aRemoteLegThatStopsAnsweringIsDegradedAfterTheTimeout() throws {
        let fixture = MirrorFixture()
        var legs = try RemoteLegMirror(fixture)
        let server = try fixture.serve([legs.leg0, legs.remote.uri, "--remote-timeout", "2", "--reconnect-interval", "0"])
        try fixture.waitFor("the first copy") { $0.allInSync }
        let handle = try fixture.connect()
        var written = try handle.writeRegions(0..<4, seed: 5)

        // A hung machine: its socket stays open and nothing answers.
        legs.remote.freeze()
        let started = ContinuousClock.now
        written.merge(try handle.writeRegions(4..<8, seed: 6)) { $1 }
        let waited = ContinuousClock.now - started
        #expect(waited >= .milliseconds(1500) && waited < .seconds(15), "the writes waited \(waited)")
        let status = try fixture.status()
        #expect(status.state(1) == .degraded)
        #expect(status.legs[1].error?.contains("ETIMEDOUT") == true)
        try handle.expectReadBack(written)

        // The machine is restarted (nbdkit 1.32 may abort when thawed under
        // a connection cut off mid-reply).
        try legs.restartRemote()
        try readdAndCompare(fixture, server, handle, legs.leg0, legs.remoteFile)
    }

    @Test func aRemoteLegThatHangsAtConnectIsGivenUpAtStart() throws {
        let fixture = MirrorFixture()
        var legs = try RemoteLegMirror(fixture, assumeClean: true)
        legs.remote.freeze()
        let arguments = [legs.leg0, legs.remote.uri, "--remote-timeout", "2"]
        let refusal = try fixture.serveRefused(arguments)
        #expect(refusal.contains("no answer within 2 s"), "\(refusal)")
        #expect(refusal.contains("--allow-missing-legs"), "\(refusal)")

        let server = try fixture.serve(arguments + ["--allow-missing-legs", "--reconnect-interval", "0"])
        #expect(try fixture.status().state(1) == .degraded)
        let handle = try fixture.connect()
        let written = try handle.writeRegions(0..<4, seed: 7)
        try handle.expectReadBack(written)

        try legs.restartRemote()
        let status = try readdAndCompare(fixture, server, handle, legs.leg0, legs.remoteFile)
        #expect(status.resync.regionsTotal == 4, "only the regions written without the leg: \(status.resync)")
    }

    @Test func afterSIGKILLOnlyDirtyRegionsAreResynced() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        var server = try fixture.serve(legs + ["--create", Self.legSize])
        var handle = try fixture.connect()
        let written = try handle.writeRegions(10..<17, seed: 5)
        handle.shutdown()
        _ = server.stop(signal: SIGKILL)

        server = try fixture.serve(legs)
        let status = try fixture.waitFor("recovery") { !$0.resync.lastResult.isEmpty && !$0.resync.active }
        #expect(status.resync.reason.contains("recovery"))
        #expect(status.resync.regionsTotal == 7, "only the 7 regions written before the kill: \(status.resync)")
        #expect(status.resync.regionsDone == 7)
        handle = try fixture.connect()
        try handle.expectReadBack(written)
        stopAndCompare(fixture, server, handle, legs[0], legs[1])
    }

    /// --resync-rate holds below a run's length a second too: three runs
    /// (8, 8 and 1 regions) at 2 MiB a second take 4 s, not the 3 s that a
    /// wait of at most a second after each run gave.
    @Test func aRecoveryKeepsToItsRateLimit() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        var server = try fixture.serve(legs + ["--create", Self.legSize])
        let handle = try fixture.connect()
        _ = try handle.writeRegions(0..<17, seed: 15)
        handle.shutdown()
        _ = server.stop(signal: SIGKILL)

        let limit = 2.0 * 1_048_576
        server = try fixture.serve(legs + ["--resync-rate", "2M"])
        let resync = try fixture.waitFor("recovery", timeout: 20) { !$0.resync.active && !$0.resync.lastResult.isEmpty }.resync
        #expect(resync.regionsDone == 17, "\(resync)")
        // Nothing waits after the last run: the bytes before it are what
        // the time taken must cover.
        let seconds = Double(resync.bytesCopied) / resync.bytesPerSecond
        let beforeTheLastRun = Double(resync.bytesCopied) - Double(testRegionBytes)
        #expect(beforeTheLastRun / seconds <= limit, "\(resync.lastResult)")
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs[0], legs[1]))
    }

    /// A rebuild held back by a low --resync-rate ends as soon as the leg
    /// it copies to is failed, not when its wait is over: the status, the
    /// events and the hooks say so at once.
    @Test func aSlowRebuildEndsAtOnceWhenItsLegIsFailed() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        let server = try fixture.serve(legs + ["--create", Self.legSize, "--resync-rate", "256K"])
        let handle = try fixture.connect()
        try fixture.control(["fail-leg", "1"])
        let written = try handle.writeRegions(0..<16, seed: 16)
        // The first run of 8 regions, then a wait of 16 s before the next.
        try fixture.control(["readd-leg", "1"])
        try fixture.waitFor("the first run copied") { $0.resync.regionsDone == 8 }
        try fixture.control(["fail-leg", "1"])
        let ended = try fixture.waitFor("the rebuild ended", timeout: 4) { !$0.resync.active }
        #expect(ended.resync.lastResult.contains("no leg left to copy to"), "\(ended.resync)")
        #expect(ended.state(1) == .degraded)
        try handle.expectReadBack(written)
        handle.shutdown()
        #expect(server.stop() == 0)
    }

    @Test func aReaddedLegGetsOnlyTheRegionsWrittenWhileItWasOut() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        let server = try fixture.serve(legs + ["--create", Self.legSize])
        let handle = try fixture.connect()
        var written = try handle.writeRegions(0..<3, seed: 6)
        try fixture.control(["fail-leg", "1"])
        written.merge(try handle.writeRegions(20..<25, seed: 7)) { $1 }
        #expect(try fixture.status().dmsetupLine.hasSuffix(" AD"))
        try handle.expectReadBack(written)
        let status = try readdAndCompare(fixture, server, handle, legs[0], legs[1])
        // Regions 0-2 may still be dirty (written less than two cleaner ticks before).
        #expect((5...8).contains(status.resync.regionsTotal), "\(status.resync)")
    }

    @Test func aLegReplacedByAnEmptyFileGetsAFullCopyUnderLoad() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        let replacement = fixture.path("new.img")
        let server = try fixture.serve(legs + ["--create", Self.legSize, "--resync-rate", "64M"])
        let handle = try fixture.connect()
        var written = try handle.writeRegions(0..<32, seed: 8)
        try run(["truncate", "-s", Self.legSize, replacement])
        try fixture.control(["fail-leg", "1"])
        try fixture.control(["replace-leg", "1", replacement])
        // Writes while the copy runs.
        written.merge(try handle.writeRegions(60..<100, seed: 9)) { $1 }
        let status = try fixture.waitFor("leg 1 in sync", timeout: 20) { $0.allInSync }
        #expect(status.legs[1].device == replacement)
        #expect(status.resync.regionsTotal == status.regions, "a full copy: \(status.resync)")
        try handle.expectReadBack(written)
        stopAndCompare(fixture, server, handle, legs[0], replacement)
    }

    @Test func corruptForeignAndUnequalLegsAreRefusedAndUntouched() throws {
        let fixture = MirrorFixture()
        let a = fixture.path("a.img"), b = fixture.path("b.img"), c = fixture.path("c.img"), d = fixture.path("d.img")
        try run([dmioNBDExecutable, "create", "--size", "16M", a, b])
        try run([dmioNBDExecutable, "create", "--size", "16M", c, d])

        // A leg of another mirror.
        var said = try fixture.serveRefused([a, c])
        #expect(said.contains("belongs to mirror"), "\(said)")

        // Both superblock slots damaged: refused, and nothing written.
        let damaged = fixture.path("damaged.img")
        try FileManager.default.copyItem(atPath: b, toPath: damaged)
        let file = try #require(FileHandle(forUpdatingAtPath: damaged))
        for slot in [100, 4096 + 100] {
            try file.seek(toOffset: UInt64(slot))
            file.write(Data([0xFF, 0xFF, 0xFF, 0xFF]))
        }
        try file.close()
        let before = try Data(contentsOf: URL(fileURLWithPath: damaged))
        said = try fixture.serveRefused([a, damaged])
        #expect(said.contains("corrupt"), "\(said)")
        #expect(said.contains("--allow-missing-legs") && said.contains("replace-leg 1"), "\(said)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: damaged)) == before)
        // As told: the mirror starts without it, and it is left alone.
        let degraded = try fixture.serve([a, damaged, "--allow-missing-legs"])
        #expect(try fixture.status().dmsetupLine.hasSuffix(" AD"))
        #expect(degraded.stop() == 0)
        #expect(try Data(contentsOf: URL(fileURLWithPath: damaged)) == before)

        // A leg of another mirror among the legs of one is named as the odd
        // one out, even when its own mirror has seen more events.
        let e = fixture.path("e.img"), f = fixture.path("f.img"), g = fixture.path("g.img")
        try run([dmioNBDExecutable, "create", "--size", "16M", e, f, g])
        for _ in 0..<2 { #expect(try fixture.serve([c, d]).stop() == 0) }
        said = try fixture.serveRefused([e, f, d])
        #expect(said.contains("leg \(d) belongs to mirror"), "\(said)")

        // Legs in the wrong order.
        said = try fixture.serveRefused([b, a])
        #expect(said.contains("given as leg"), "\(said)")

        // Unequal sizes, when making a mirror.
        let small = fixture.path("small.img"), large = fixture.path("large.img")
        try run(["truncate", "-s", "16M", small])
        try run(["truncate", "-s", "32M", large])
        let unequal = #expect(throws: CommandFailed.self) { try run([dmioNBDExecutable, "create", small, large]) }
        #expect(unequal?.output.contains("legs of unequal size") == true, "\(String(describing: unequal))")
        // A plain file that is no mirror is not taken for one.
        said = try fixture.serveRefused([small, large])
        #expect(said.contains("no dmio-nbd mirror metadata"), "\(said)")

        // A leg with damaged metadata is not served alone as a plain device.
        said = try fixture.serveRefused([damaged])
        #expect(said.contains("may be a leg of a mirror"), "\(said)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: damaged)) == before)

        // A start refused for its socket (another server on it) writes nothing.
        let server = try fixture.serve([a, b])
        let legsBefore = try [c, d].map { try Data(contentsOf: URL(fileURLWithPath: $0)) }
        said = try fixture.serveRefused([c, d])
        #expect(said.contains("in use by pid"), "\(said)")
        #expect(try [c, d].map { try Data(contentsOf: URL(fileURLWithPath: $0)) } == legsBefore)
        #expect(server.stop() == 0)
    }

    /// A leg put back from an old copy (a restored backup or VM snapshot)
    /// while the other leg went on: its superblock is older. It must not be
    /// read from, and it gets a full copy.
    @Test func anOldCopyOfALegPutBackIsRebuiltNotRead() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("a.img"), fixture.path("b.img")]
        var server = try fixture.serve(legs + ["--create", "16M"])
        var handle = try fixture.connect()
        try handle.write(pattern(64 << 10, seed: 10), at: 0)
        handle.shutdown()
        #expect(server.stop() == 0)
        let oldCopy = fixture.path("a.old")
        try FileManager.default.copyItem(atPath: legs[0], toPath: oldCopy)

        server = try fixture.serve(legs)
        handle = try fixture.connect()
        let newer = pattern(64 << 10, seed: 11)
        try handle.write(newer, at: 0)
        handle.shutdown()
        #expect(server.stop() == 0)
        try FileManager.default.removeItem(atPath: legs[0])
        try FileManager.default.moveItem(atPath: oldCopy, toPath: legs[0])

        server = try fixture.serve(legs)
        handle = try fixture.connect()
        #expect(try handle.read(newer.count, at: 0) == newer)
        try fixture.waitFor("the rebuild of leg 0") { $0.allInSync }
        stopAndCompare(fixture, server, handle, legs[0], legs[1])
    }

    /// A crash between the legs' superblock writes, while leg 1 is being
    /// rebuilt from leg 0, leaves leg 0 an event behind: leg 0 is still the
    /// only in-sync copy, and the mirror must open on it.
    @Test func aCrashBetweenSuperblockWritesKeepsTheLastInSyncLeg() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("a.img"), fixture.path("b.img")]
        try run(["dd", "if=/dev/urandom", "of=\(legs[0])", "bs=1M", "count=16", "status=none"])
        try run(["truncate", "-s", "16M", legs[1]])
        try run([dmioNBDExecutable, "create"] + legs)  // leg 1 gets a copy of leg 0's data
        var server = try fixture.serve(legs + ["--resync-rate", "1M"])
        _ = server.stop(signal: SIGKILL)
        // The start's event 2 (slot 0) reached leg 1 only.
        let file = try #require(FileHandle(forUpdatingAtPath: legs[0]))
        try file.seek(toOffset: 0)
        file.write(Data(count: 4096))
        try file.close()

        server = try fixture.serve(legs)
        #expect(try fixture.status().state(0) == .inSync)
        try fixture.waitFor("the rebuild of leg 1") { $0.allInSync }
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs[0], legs[1]))
    }

    /// The first start after `create` writes the superblocks' second event:
    /// a write torn there (a crash, a power cut) must leave the first.
    @Test func aTornFirstSuperblockWriteLeavesTheMirrorStartable() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("a.img"), fixture.path("b.img")]
        try run([dmioNBDExecutable, "create", "--size", "16M"] + legs)
        for leg in legs {
            // Event 2 goes to slot 0; half of it arrived.
            let file = try #require(FileHandle(forUpdatingAtPath: leg))
            try file.seek(toOffset: 0)
            file.write(Data(Array("DMIOMIRR".utf8) + [UInt8](repeating: 0xA5, count: 504)))
            try file.close()
        }
        let server = try fixture.serve(legs)
        #expect(try fixture.status().allInSync)
        #expect(server.stop() == 0)
    }

    @Test func aStopDuringRecoveryLeavesTheRecoveryForTheNextStart() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        var server = try fixture.serve(legs + ["--create", Self.legSize])
        var handle = try fixture.connect()
        let written = try handle.writeRegions(0..<40, seed: 10)
        handle.shutdown()
        _ = server.stop(signal: SIGKILL)

        // A slow recovery, stopped at once.
        server = try fixture.serve(legs + ["--resync-rate", "1M"])
        try fixture.waitFor("the recovery to start") { $0.resync.active }
        #expect(server.stop() == 0)

        server = try fixture.serve(legs)
        let status = try fixture.waitFor("recovery") { !$0.resync.active && !$0.resync.lastResult.isEmpty }
        #expect(status.resync.reason.contains("recovery"))
        #expect(status.resync.regionsTotal == 40, "\(status.resync)")
        handle = try fixture.connect()
        try handle.expectReadBack(written)
        stopAndCompare(fixture, server, handle, legs[0], legs[1])
    }

    @Test func aMirrorWithAnUnreachableLegStartsDegraded() throws {
        let fixture = MirrorFixture()
        let leg0 = fixture.path("leg0.img"), remoteFile = fixture.path("leg1.img")
        try run(["truncate", "-s", Self.legSize, leg0, remoteFile])
        let remoteSocket = fixture.path("leg1.sock")
        var remote: NBDKit? = try NBDKit(["file", remoteFile], socket: remoteSocket)
        let uri = remote!.uri
        try run([dmioNBDExecutable, "create", "--assume-clean", leg0, uri])
        remote = nil  // the leg's server is gone before the mirror starts

        // The other leg last saw it in sync: it might be newer, so the operator decides.
        let refused = try fixture.serveRefused([leg0, uri])
        #expect(refused.contains("may hold newer data"), "\(refused)")
        let server = try fixture.serve([leg0, uri, "--allow-missing-legs", "--reconnect-interval", "0"])
        let status = try fixture.status()
        #expect(status.state(0) == .inSync)
        #expect(status.state(1) == .degraded)
        #expect(status.legs[1].why?.hasPrefix("open") == true, "\(status.legs[1])")
        let handle = try fixture.connect()
        let written = try handle.writeRegions(0..<4, seed: 11)
        try handle.expectReadBack(written)

        remote = try NBDKit(["file", remoteFile], socket: remoteSocket)
        try readdAndCompare(fixture, server, handle, leg0, remoteFile)
    }

    @Test func legsInUseAreNotServedAloneNorTakenAsReplacements() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        try run([dmioNBDExecutable, "create", "--size", "16M", legs[0], legs[1]])
        let said = try fixture.serveRefused([legs[0]])
        #expect(said.contains("is a leg of mirror"), "\(said)")

        let server = try fixture.serve(legs)
        // A second server of the same legs, and a new mirror over them, while they are served.
        let second = try fixture.serveRefused(legs, socket: fixture.path("other.sock"))
        #expect(second.contains("is in use by pid \(server.process.processIdentifier)"), "\(second)")
        let recreate = #expect(throws: CommandFailed.self) { try run([dmioNBDExecutable, "create", "--force"] + legs) }
        #expect(recreate?.output.contains("is in use by pid \(server.process.processIdentifier)") == true,
                "\(String(describing: recreate))")
        #expect(try fixture.status().dmsetupLine.hasSuffix(" AA"))

        try fixture.control(["fail-leg", "1"])
        let refused = #expect(throws: CommandFailed.self) { try fixture.control(["replace-leg", "1", legs[0]]) }
        #expect(refused?.output.contains("holds the metadata of mirror") == true, "\(String(describing: refused))")
        let last = #expect(throws: CommandFailed.self) { try fixture.control(["fail-leg", "0"]) }
        #expect(last?.output.contains("last in-sync leg") == true, "\(String(describing: last))")
        #expect(try fixture.status().dmsetupLine.hasSuffix(" AD"))
        #expect(server.stop() == 0)
    }

    @Test func clientsSeeDegradedRangesInTheHealthMetaContext() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        let server = try fixture.serve(legs + ["--create", "16M"])
        let lister = try NBDHandle()
        try lister.setOptionMode(true)
        try lister.connect(unixSocket: fixture.socket)
        #expect(try lister.optListMetaContext() == ["base:allocation", "dmio:health"])
        try lister.optAbort()

        let handle = try NBDHandle()
        try handle.addMetaContext("dmio:health")
        try handle.addMetaContext("base:allocation")
        try handle.connect(unixSocket: fixture.socket)
        #expect(try handle.canMetaContext("dmio:health"))
        let size = try handle.size()
        #expect(try handle.blockStatus(count: size, offset: 0)["dmio:health"] == [NBDExtent(length: UInt32(size), flags: 0)])

        try fixture.control(["fail-leg", "1"])
        _ = try handle.writeRegions(2..<4, seed: 12)
        let region = UInt32(testRegionBytes)
        let health = try handle.blockStatus(count: size, offset: 0)
        #expect(health["dmio:health"] == [NBDExtent(length: 2 * region, flags: 0),
                                          NBDExtent(length: 2 * region, flags: 1),
                                          NBDExtent(length: UInt32(size) - 4 * region, flags: 0)])
        #expect(health["base:allocation"] != nil)
        let one = try handle.blockStatus(count: size - UInt64(2 * region), offset: UInt64(2 * region), flags: .reqOne)
        #expect(one["dmio:health"] == [NBDExtent(length: 2 * region, flags: 1)])

        try fixture.control(["readd-leg", "1"])
        try fixture.waitFor("leg 1 in sync") { $0.allInSync }
        #expect(try handle.blockStatus(count: size, offset: 0)["dmio:health"] == [NBDExtent(length: UInt32(size), flags: 0)])
        handle.shutdown()
        #expect(server.stop() == 0)
    }

    @Test func aStaleLegServedAloneNeverOverwritesANewerOne() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        var server = try fixture.serve(legs + ["--create", Self.legSize])
        try fixture.control(["fail-leg", "1"])
        var handle = try fixture.connect()
        let newer = try handle.writeRegions(0..<2, seed: 13)  // only leg 0 has these
        handle.shutdown()
        #expect(server.stop() == 0)

        // Leg 0 goes missing; leg 1's stale view is all that is left.
        let away = fixture.path("leg0.away")
        try FileManager.default.moveItem(atPath: legs[0], toPath: away)
        server = try fixture.serve(legs + ["--allow-missing-legs"])
        try FileManager.default.moveItem(atPath: away, toPath: legs[0])
        let refused = #expect(throws: CommandFailed.self) { try fixture.control(["readd-leg", "0"]) }
        #expect(refused?.output.contains("was used without the legs now in sync") == true, "\(String(describing: refused))")
        #expect(server.stop() == 0)

        // Each leg was used without the other: the operator must choose.
        let said = try fixture.serveRefused(legs)
        #expect(said.contains("were each used without the other"), "\(said)")

        // Leg 0 kept alone, leg 1 put back as a replacement: the newer data survives.
        try FileManager.default.moveItem(atPath: legs[1], toPath: fixture.path("leg1.old"))
        server = try fixture.serve(legs + ["--allow-missing-legs"])
        try run(["truncate", "-s", Self.legSize, fixture.path("leg1.new")])
        try fixture.control(["replace-leg", "1", fixture.path("leg1.new")])
        try fixture.waitFor("the new leg in sync") { $0.allInSync }
        handle = try fixture.connect()
        try handle.expectReadBack(newer)
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs[0], fixture.path("leg1.new")))
    }

    @Test func aLegThatFailsDuringItsResyncGoesBackToDegraded() throws {
        let fixture = MirrorFixture()
        let trigger = fixture.path("fail-writes")
        let leg0 = fixture.path("leg0.img"), remoteFile = fixture.path("leg1.img")
        try run(["truncate", "-s", Self.legSize, leg0, remoteFile])
        let remote = try NBDKit(["--filter=error", "file", remoteFile, "error-pwrite=EIO",
                                 "error-pwrite-rate=100%", "error-pwrite-file=\(trigger)"])
        try run([dmioNBDExecutable, "create", "--assume-clean", leg0, remote.uri])
        let server = try fixture.serve([leg0, remote.uri, "--resync-rate", "2M"])
        let handle = try fixture.connect()
        try fixture.control(["fail-leg", "1"])
        let written = try handle.writeRegions(0..<10, seed: 14)

        // A slow rebuild; the leg fails under it.
        try fixture.control(["readd-leg", "1"])
        try fixture.waitFor("the rebuild to start") { $0.resync.active }
        #expect(FileManager.default.createFile(atPath: trigger, contents: nil))
        let status = try fixture.waitFor("leg 1 degraded again") { $0.state(1) == .degraded && !$0.resync.active }
        #expect(status.state(0) == .inSync)
        #expect(status.legs[1].error?.contains("EIO") == true)
        try handle.expectReadBack(written)

        try FileManager.default.removeItem(atPath: trigger)
        // Bits cleared during the rebuild, before the leg failed, may be
        // newer than the leg's own superblock (a timer clears them): then
        // it gets a full copy, 63 MiB at 2 MiB/s.
        try readdAndCompare(fixture, server, handle, leg0, remoteFile, timeout: 60)
    }
}

/// A mirror of a local leg 0 and a leg 1 that nbdkit serves from a file, on
/// a socket that a restarted nbdkit takes again.
private struct RemoteLegMirror {
    let leg0: String
    let remoteFile: String
    let remoteSocket: String
    private(set) var remote: NBDKit

    init(_ fixture: MirrorFixture, assumeClean: Bool = false) throws {
        leg0 = fixture.path("leg0.img")
        remoteFile = fixture.path("leg1.img")
        remoteSocket = fixture.path("leg1.sock")
        try run(["truncate", "-s", FaultTests.legSize, leg0, remoteFile])
        remote = try NBDKit(["file", remoteFile], socket: remoteSocket)
        try run([dmioNBDExecutable, "create"] + (assumeClean ? ["--assume-clean"] : []) + [leg0, remote.uri])
    }

    /// The leg's machine comes back: nbdkit serves its file again.
    mutating func restartRemote() throws {
        remote.kill()
        remote = try NBDKit(["file", remoteFile], socket: remoteSocket)
    }
}
