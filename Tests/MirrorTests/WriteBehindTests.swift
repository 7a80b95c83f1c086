import Foundation
import LibNBD
import Mirror
import TestSupport
import Testing

/// Write-mostly legs (md's --write-mostly, --write-behind) and pull-ahead
/// (DRBD's on-congestion), over a leg that nbdkit's delay filter makes slow.
@Suite(.serialized) struct WriteBehindTests {
    /// A mirror, in sync, of leg `slowLeg` a file behind nbdkit's delay
    /// filter (each write `delay` late) and the other a local file.
    private struct SlowLegMirror {
        let localFile: String
        let remoteFile: String
        let socket: String
        let slowLeg: Int
        let delay: String
        var remote: NBDKit

        /// With `log`, nbdkit's log filter writes each request the slow leg
        /// gets, and when it was done, to that file.
        init(_ fixture: MirrorFixture, slowLeg: Int = 1, delay: String, reads: String = "0", log: String? = nil) throws {
            localFile = fixture.path("local.img")
            remoteFile = fixture.path("remote.img")
            socket = fixture.path("slow.sock")
            self.slowLeg = slowLeg
            self.delay = delay
            try run(["truncate", "-s", "64M", localFile, remoteFile])
            var arguments = ["--filter=delay", "file", remoteFile, "wdelay=\(delay)", "rdelay=\(reads)"]
            if let log { arguments = ["--filter=log"] + arguments + ["logfile=\(log)"] }
            remote = try NBDKit(arguments, socket: socket)
            try run([dmioNBDExecutable, "create", "--assume-clean"] + legs)
        }

        var uri: String { "nbd+unix:///?socket=\(socket)" }
        var legs: [String] { slowLeg == 0 ? [uri, localFile] : [localFile, uri] }

        /// SIGKILL, then the same file again on the same socket.
        mutating func restartRemote() throws {
            remote.kill()
            remote = try NBDKit(["--filter=delay", "file", remoteFile, "wdelay=\(delay)"], socket: socket)
        }
    }

    /// Seconds that `body` takes.
    private func seconds(_ body: () throws -> Void) rethrows -> Double {
        let start = ContinuousClock.now
        try body()
        let (whole, fraction) = (ContinuousClock.now - start).components
        return Double(whole) + Double(fraction) / 1e18
    }

    /// Writes `count` 4 KiB blocks side by side from `offset`, one at a
    /// time; returns what it wrote.
    private func writeBlocks(_ handle: NBDHandle, from offset: UInt64, count: Int, seed: UInt8) throws -> [UInt8] {
        let bytes = pattern(count * 4096, seed: seed)
        for block in 0..<count {
            try handle.write(Array(bytes[block * 4096..<(block + 1) * 4096]), at: offset + UInt64(block * 4096))
        }
        return bytes
    }

    @Test func aWriteIsAnsweredWithoutWaitingForAWriteMostlyLeg() throws {
        let fixture = MirrorFixture()
        let log = fixture.path("slow-leg.log")
        let legs = try SlowLegMirror(fixture, delay: "2", log: log)
        // No lease: its renewals write the superblocks every few seconds,
        // under way or not beside the writes behind, as it happens.
        let server = try fixture.serve(legs.legs + ["--write-mostly", "1", "--lease", "0"])
        let handle = try fixture.connect()
        // The first write to a clean region: its bit goes to the slow leg behind too.
        let first = try seconds { _ = try writeBlocks(handle, from: 0, count: 1, seed: 1) }
        #expect(first < 1.0, "the first write to a clean region took \(first) s")
        var written: [UInt8] = []
        let took = try seconds { written = try writeBlocks(handle, from: 4096, count: 8, seed: 2) }
        // Eight writes behind a leg that takes 2 s each: without write-behind, 16 s.
        #expect(took < 1.5, "8 writes took \(took) s")
        let status = try fixture.status()
        #expect(status.legs[1].writeMostly == true && status.legs[0].writeMostly == false)
        #expect(status.state(1) == .inSync)
        #expect(status.legs[1].writesBehind ?? 0 > 0, "\(status.legs[1])")
        #expect(try handle.read(written.count, at: 4096) == written)
        handle.shutdown()
        // The stop records the legs clean only once the writes behind have
        // reached the slow leg: a crash between the two would leave a clean
        // mirror whose legs differ.
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs.localFile, legs.remoteFile))
        #expect(server.stderr().contains("writes behind to reach the write-mostly legs"))
        // Each flush and metadata write that came after the writes behind
        // began came after they were done: a flush covers only the writes
        // done before it.
        let requests = NBDKitLog(path: log).requests.filter { $0.command == "Write" || $0.command == "Flush" }
        let writesBehind = requests.filter { $0.offset ?? 0 >= 1 << 20 }
        let firstSent = try #require(writesBehind.map(\.sent).min())
        let lastDone = try #require(writesBehind.map { $0.done ?? .max }.max())
        #expect(writesBehind.count == 9 && writesBehind.allSatisfy { $0.done != nil })
        #expect(requests.contains { $0.command == "Flush" && $0.sent > lastDone }, "the stop's flush")
        for request in requests where request.offset ?? 0 < 1 << 20 && request.sent > firstSent {
            #expect(request.sent > lastDone, "\(request) sent while a write behind was under way")
        }
    }

    /// A stop that waits for writes behind no longer listens: a server
    /// started on its socket meanwhile finds the socket stale and makes its
    /// own. The first, once stopped, leaves that one and its pid file be.
    @Test func aServerStartedOnTheSocketWhileTheLastStopsKeepsIt() throws {
        let fixture = MirrorFixture()
        let legs = try SlowLegMirror(fixture, delay: "2")
        let pidFile = fixture.path("dmio-nbd.pid")
        let first = try fixture.serve(legs.legs + ["--write-mostly", "1", "--lease", "0", "--pidfile", pidFile])
        let handle = try fixture.connect()
        _ = try writeBlocks(handle, from: 0, count: 3, seed: 3)
        handle.shutdown()
        kill(first.process.processIdentifier, SIGTERM)
        #expect(first.logs("writes behind to reach the write-mostly legs", within: 5))
        // The slow leg's server frozen: the first waits, however long the
        // second takes to start.
        legs.remote.freeze(limit: 60)
        let otherLegs = [fixture.path("other0.img"), fixture.path("other1.img")]
        let second = try fixture.serve(otherLegs + ["--create", "64M", "--pidfile", pidFile])
        #expect(first.process.isRunning, "the first stopped before the second started: nothing was shown")
        legs.remote.thaw()
        #expect(first.exits(within: 30))
        #expect(answers(fixture.socket), "the first server removed the second's socket")
        #expect(FileManager.default.fileExists(atPath: pidFile), "the first server removed the second's pid file")
        #expect(second.stop() == 0)
        #expect(!FileManager.default.fileExists(atPath: fixture.socket) && !FileManager.default.fileExists(atPath: pidFile))
    }

    /// A client that rewrites what it was told is written: the rewrite
    /// waits for the write behind, so the older bytes never land last.
    @Test func aRewriteOfAWriteStillBehindWaitsForIt() throws {
        let fixture = MirrorFixture()
        let legs = try SlowLegMirror(fixture, delay: "1")
        let server = try fixture.serve(legs.legs + ["--write-mostly", "1"])
        let handle = try fixture.connect()
        _ = try writeBlocks(handle, from: 0, count: 1, seed: 7)
        _ = try writeBlocks(handle, from: 8192, count: 1, seed: 8)
        var rewritten: [UInt8] = []
        let rewrite = try seconds { rewritten = try writeBlocks(handle, from: 8192, count: 1, seed: 9) }
        let beside = try seconds { _ = try writeBlocks(handle, from: 16384, count: 1, seed: 10) }
        #expect(rewrite >= 0.5, "the rewrite took \(rewrite) s: it did not wait for the write behind")
        #expect(beside < 0.5, "a write beside it took \(beside) s")
        _ = try fixture.waitFor("no write behind", timeout: 20) { $0.legs[1].writesBehind == 0 }
        #expect(try handle.read(4096, at: 8192) == rewritten)
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs.localFile, legs.remoteFile))
    }

    /// A leg no longer write-mostly is read from: only once what was on its
    /// way to it has landed.
    @Test func aLegNoLongerWriteMostlyIsReadOnlyOnceItsWritesLanded() throws {
        let fixture = MirrorFixture()
        let legs = try SlowLegMirror(fixture, slowLeg: 0, delay: "1")
        let server = try fixture.serve(legs.legs + ["--write-mostly", "0", "--read-policy", "first", "--lease", "0"])
        let handle = try fixture.connect()
        _ = try writeBlocks(handle, from: 0, count: 1, seed: 11)
        let written = try writeBlocks(handle, from: 4096, count: 4, seed: 12)
        #expect(try fixture.status().legs[0].writesBehind ?? 0 > 0)
        // Read while the change is under way: leg 0 is first again once it
        // is not write-mostly (--read-policy first reads it).
        let change = Process()
        change.executableURL = URL(fileURLWithPath: dmioNBDExecutable)
        change.arguments = ["set-leg", "0", "--no-write-mostly", "--socket", fixture.socket]
        try change.run()
        usleep(300_000)
        #expect(try handle.read(written.count, at: 4096) == written)
        change.waitUntilExit()
        #expect(change.terminationStatus == 0)
        #expect(try fixture.status().legs[0].writeMostly == false)
        #expect(try handle.read(written.count, at: 4096) == written)
        handle.shutdown()
        #expect(server.stop() == 0)
    }

    /// Local legs (io_uring): the writes behind go on the mirror's own ring,
    /// which outlives the connections' event loops at a stop.
    @Test func aLocalWriteMostlyLegUnderFioStopsCleanAndEqual() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        let server = try fixture.serve(legs + ["--create", "64M", "--write-mostly", "1"])
        try run(["fio", "--name=local", "--ioengine=nbd", "--uri=\(fixture.uri)", "--rw=randwrite", "--bs=4k",
                 "--size=8M", "--offset_increment=16M", "--numjobs=2", "--iodepth=32", "--verify=crc32c",
                 "--verify_state_save=0", "--group_reporting"])
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs[0], legs[1]))
    }

    @Test func withoutWriteBehindAWriteWaitsForTheWriteMostlyLeg() throws {
        let fixture = MirrorFixture()
        let legs = try SlowLegMirror(fixture, delay: "300ms")
        let server = try fixture.serve(legs.legs + ["--write-mostly", "1", "--write-behind", "0"])
        let handle = try fixture.connect()
        _ = try writeBlocks(handle, from: 0, count: 1, seed: 1)
        let took = try seconds { _ = try writeBlocks(handle, from: 4096, count: 4, seed: 2) }
        #expect(took >= 1.2, "4 writes took \(took) s")
        handle.shutdown()
        #expect(server.stop() == 0)
    }

    /// Reads avoid a write-mostly leg: leg 0, slow to read, would be the
    /// balanced policy's first pick among idle legs.
    @Test func readsGoToTheOtherLegsAndTheMarkIsKeptAndChangedOnline() throws {
        let fixture = MirrorFixture()
        let legs = try SlowLegMirror(fixture, slowLeg: 0, delay: "0", reads: "200ms")
        var server = try fixture.serve(legs.legs)
        try fixture.control(["set-leg", "0", "--write-mostly"])
        var handle = try fixture.connect()
        let took = try seconds {
            for block in 0..<10 { _ = try handle.read(4096, at: UInt64(block) << 20) }
        }
        #expect(took < 1, "10 reads took \(took) s")
        handle.shutdown()
        #expect(server.stop() == 0)
        let examined = try run([dmioNBDExecutable, "examine", legs.localFile])
        #expect(examined.contains("in sync, write-mostly"), "\(examined)")
        // Recorded: the next start needs no flag.
        server = try fixture.serve(legs.legs)
        #expect(try fixture.status().legs[0].writeMostly == true)
        let undone = try fixture.control(["set-leg", "0", "--no-write-mostly"])
        #expect(undone.legs[0].writeMostly == false)
        handle = try fixture.connect()
        handle.shutdown()
        #expect(server.stop() == 0)
    }

    /// Leg 0 is the slow write-mostly leg: the recovery after the kill must
    /// copy from leg 1, which has every write answered, never from leg 0.
    /// No lease: its renewals would leave a superblock write to leg 0 in
    /// flight at the kill, and leg 0 would get a full copy instead.
    @Test func aKillWithWritesBehindLosesNothing() throws {
        let fixture = MirrorFixture()
        var legs = try SlowLegMirror(fixture, slowLeg: 0, delay: "1")
        var server = try fixture.serve(legs.legs + ["--write-mostly", "0", "--lease", "0"])
        var handle = try fixture.connect()
        _ = try writeBlocks(handle, from: 0, count: 1, seed: 3)
        let written = try writeBlocks(handle, from: 0, count: 32, seed: 4)
        let behind = try fixture.status().legs[0].writesBehind ?? 0
        #expect(behind > 0, "writes outstanding to leg 0: \(behind)")
        handle.shutdown()
        _ = server.stop(signal: SIGKILL)
        // The writes the slow leg had not done yet die with its server.
        try legs.restartRemote()
        server = try fixture.serve(legs.legs + ["--lease", "0"])
        let status = try fixture.waitFor("recovery", timeout: 30) { $0.allInSync && !$0.resync.lastResult.isEmpty }
        #expect(status.resync.reason.contains("recovery"), "\(status.resync)")
        // Leg 1's bitmap was not behind: only the regions written are copied.
        #expect(status.resync.regionsTotal < status.regions, "\(status.resync)")
        handle = try fixture.connect()
        #expect(try handle.read(written.count, at: 0) == written)
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs.localFile, legs.remoteFile))
    }

    /// The slow leg's bitmap is written behind: after a crash, without the
    /// leg whose bitmap was not, every region counts as dirty (the slow
    /// leg's own bitmap lacks the bit of the last write, which never
    /// reached it: its server died with the kill too).
    @Test func aCrashWithTheBitmapBehindMarksEveryRegionWithoutTheOtherLeg() throws {
        let fixture = MirrorFixture()
        var legs = try SlowLegMirror(fixture, slowLeg: 0, delay: "2")
        var server = try fixture.serve(legs.legs + ["--write-mostly", "0", "--lease", "0"])
        let handle = try fixture.connect()
        _ = try writeBlocks(handle, from: 0, count: 1, seed: 5)
        handle.shutdown()
        _ = server.stop(signal: SIGKILL)
        try legs.restartRemote()
        server = try fixture.serve([legs.uri, fixture.path("gone.img"), "--allow-missing-legs", "--lease", "0"])
        let status = try fixture.status()
        #expect(status.dirtyRegions == status.regions, "\(status.dirtyRegions) of \(status.regions) dirty")
        #expect(server.stop() == 0)
        #expect(server.stderr().contains("had their bitmaps written behind"))
    }

    @Test func aCongestedLegIsPulledAheadAndCaughtUp() throws {
        let fixture = MirrorFixture()
        let legs = try SlowLegMirror(fixture, delay: "1")
        let server = try fixture.serve(legs.legs + ["--write-mostly", "1", "--write-behind", "2",
                                                    "--on-congestion", "pull-ahead"])
        let watcher = try EventTests.Watcher(["--now", "--socket", fixture.socket])
        watcher.waitFor("exists -", timeout: 10)
        let handle = try fixture.connect()
        _ = try writeBlocks(handle, from: 0, count: 1, seed: 5)
        var written: [UInt8] = []
        // Two writes fill its backlog; the third pulls ahead of it, and no write waits for it.
        let took = try seconds { written = try writeBlocks(handle, from: 4096, count: 6, seed: 6) }
        #expect(took < 1, "6 writes took \(took) s")
        watcher.waitFor("change leg", "leg:1", "state:in_sync->behind", timeout: 10)
        // Once its two writes end, a resync copies it what it missed.
        watcher.waitFor("change leg", "leg:1", "state:behind->rebuilding", timeout: 10)
        let back = try fixture.waitFor("leg 1 caught up", timeout: 20) { $0.allInSync }
        #expect(back.resync.regionsTotal >= 1 && back.resync.regionsTotal < back.regions / 2, "\(back.resync)")
        #expect(try handle.read(written.count, at: 4096) == written)
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs.localFile, legs.remoteFile))
        #expect(server.stderr().contains("pulled ahead of it"))
    }

    /// The operator fails a leg pulled ahead: it is not caught up once its
    /// writes behind end, nor at the next start, but only by `readd-leg`.
    @Test func aLegPulledAheadAndFailedByTheOperatorStaysOut() throws {
        let fixture = MirrorFixture()
        let legs = try SlowLegMirror(fixture, delay: "1")
        let arguments = legs.legs + ["--write-mostly", "1", "--write-behind", "1", "--on-congestion", "pull-ahead"]
        var server = try fixture.serve(arguments)
        var handle = try fixture.connect()
        _ = try writeBlocks(handle, from: 0, count: 1, seed: 15)
        let written = try writeBlocks(handle, from: 4096, count: 3, seed: 16)
        // Its write behind does not end while the operator fails it: it cannot be caught up first.
        legs.remote.freeze()
        #expect(try fixture.status().legs[1].condition == .behind)
        let failed = try fixture.control(["fail-leg", "1"])
        #expect(failed.legs[1].why == "operator", "\(failed.legs[1])")
        legs.remote.thaw()
        // Its write behind ends within 1 s: a leg still behind would be caught up by then.
        usleep(3_000_000)
        #expect(try fixture.status().legs[1].why == "operator", "not caught up")

        handle.shutdown()
        #expect(server.stop() == 0)
        server = try fixture.serve(arguments)
        usleep(2_000_000)
        #expect(try fixture.status().legs[1].why == "operator", "still out after a restart")
        try fixture.control(["readd-leg", "1"])
        try fixture.waitFor("leg 1 in sync", timeout: 20) { $0.allInSync }
        handle = try fixture.connect()
        #expect(try handle.read(written.count, at: 4096) == written)
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs.localFile, legs.remoteFile))
    }

    /// A leg pulled ahead whose server dies with a write on its way: out for
    /// that lost connection, and taken back by the retries once it answers.
    @Test func aLegPulledAheadWhoseServerDiesComesBackByItself() throws {
        let fixture = MirrorFixture()
        var legs = try SlowLegMirror(fixture, delay: "1")
        let server = try fixture.serve(legs.legs + ["--write-mostly", "1", "--write-behind", "1", "--on-congestion",
                                                    "pull-ahead", "--reconnect-interval", "0.5", "--lease", "0"])
        let handle = try fixture.connect()
        _ = try writeBlocks(handle, from: 0, count: 1, seed: 13)
        let written = try writeBlocks(handle, from: 4096, count: 3, seed: 14)
        #expect(try fixture.status().legs[1].condition == .behind)
        try legs.restartRemote()
        let back = try fixture.waitFor("leg 1 back by itself", timeout: 30) { $0.allInSync }
        #expect(back.resync.regionsTotal < back.regions / 2, "\(back.resync)")
        #expect(try handle.read(written.count, at: 4096) == written)
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs.localFile, legs.remoteFile))
        #expect(server.stderr().contains("answers again: re-added"))
    }

    /// Many writes in flight at once over a write-mostly leg that is slow
    /// and a backlog that fills and blocks: what fio verifies, and the legs
    /// equal once it drained.
    @Test func fioVerifiesOverAWriteMostlyLegThatBlocks() throws {
        let fixture = MirrorFixture()
        let legs = try SlowLegMirror(fixture, delay: "5ms")
        let server = try fixture.serve(legs.legs + ["--write-mostly", "1", "--write-behind", "16"])
        try run(["fio", "--name=behind", "--ioengine=nbd", "--uri=\(fixture.uri)", "--rw=randwrite", "--bs=4k",
                 "--size=4M", "--offset_increment=8M", "--numjobs=2", "--iodepth=16", "--loops=3",
                 "--verify=crc32c", "--verify_backlog=64", "--verify_state_save=0", "--group_reporting"])
        _ = try fixture.waitFor("no write behind", timeout: 20) { $0.legs[1].writesBehind == 0 }
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs.localFile, legs.remoteFile))
    }
}
