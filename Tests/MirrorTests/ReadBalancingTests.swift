import Foundation
import LibNBD
import TestSupport
import Testing

/// `serve --read-policy`: with leg 0 behind nbdkit's delay filter (each of
/// its reads 20 ms late, as a leg on a far network) and leg 1 a local file,
/// which leg the reads of a real client (fio's nbd engine, libnbd) went
/// to, by the legs' counts in the metrics.
@Suite(.serialized) struct ReadBalancingTests {
    private struct Served {
        let reads: [Double]
        var share: Double { reads[0] / reads.reduce(0, +) }
    }

    /// A new mirror, in sync, of leg 0 behind nbdkit's delay filter (each
    /// read 20 ms late) and leg 1 a local file.
    private func slowAndFastLegs(_ fixture: MirrorFixture) throws -> (slow: NBDKit, fast: String) {
        let slowFile = fixture.path("leg0.img")
        let fast = fixture.path("leg1.img")
        try run(["truncate", "-s", "64M", slowFile, fast])
        let slow = try NBDKit(["--filter=delay", "file", slowFile, "rdelay=20ms"])
        try run([dmioNBDExecutable, "create", "--assume-clean", slow.uri, fast])
        return (slow, fast)
    }

    private func randomReads(policy: ReadPolicyArgument) throws -> Served {
        let fixture = MirrorFixture()
        let (slow, fast) = try slowAndFastLegs(fixture)
        let metrics = fixture.path("metrics.sock")
        // No lease: its reads of the legs' superblocks would count among the reads.
        let server = try fixture.serve([slow.uri, fast, "--metrics", "unix:" + metrics, "--lease", "0"] + policy.arguments)
        let handle = try fixture.connect()
        let written = try handle.writeRegions(0..<16, seed: 3)
        try handle.expectReadBack(written)
        let before = try Scraped.read(metrics)
        try run(["fio", "--name=reads", "--ioengine=nbd", "--uri=\(fixture.uri)", "--rw=randread", "--bs=4k",
                 "--iodepth=8", "--runtime=2", "--time_based", "--randrepeat=0", "--output=/dev/null"])
        let after = try Scraped.read(metrics)
        try handle.expectReadBack(written)
        #expect(try fixture.status().readPolicy == "\(policy)")
        handle.shutdown()
        #expect(server.stop() == 0)
        return Served(reads: (0..<2).map { leg in
            let labels = ["leg": "\(leg)", "op": "read"]
            return (after.value("dmio_leg_requests_total", labels) ?? 0) - (before.value("dmio_leg_requests_total", labels) ?? 0)
        })
    }

    @Test func balancedReadsAvoidASlowLeg() throws {
        let served = try randomReads(policy: .balanced)
        // About one read at a time waits for the slow leg (while it has one
        // in flight, the other has fewer): 100 in 2 s, against thousands; a
        // policy blind to the legs' load would send it half. (Under a full
        // suite on two cores, with the fast leg slowed too, it served 5.3 %.)
        #expect(served.reads[1] > 2000, "\(served.reads)")
        #expect(served.share < 0.1, "the slow leg served \(served.reads[0]) of \(served.reads.reduce(0, +))")
    }

    @Test func firstReadsTheFirstLegHoweverSlow() throws {
        let served = try randomReads(policy: .first)
        #expect(served.reads[1] == 0, "\(served.reads)")
        #expect(served.reads[0] > 0)
    }

    /// After an unclean stop the legs may differ in their dirty regions: a
    /// write reached leg 1 and not leg 0 before the crash. The recovery
    /// copies leg 0 over leg 1, so until it has, every read comes from leg
    /// 0, however busy (its reads are 20 ms late): a read answered from leg
    /// 1 would be undone by the copy, with no write in between.
    @Test func duringARecoveryReadsComeFromTheLegItCopiesFrom() throws {
        let fixture = MirrorFixture()
        let (slow, fast) = try slowAndFastLegs(fixture)
        var server = try fixture.serve([slow.uri, fast])
        let handle = try fixture.connect()
        let written = try handle.writeRegions(0..<40, seed: 6)
        handle.shutdown()
        _ = server.stop(signal: SIGKILL)
        // What only leg 1 got: region 35, written on leg 1 alone (the
        // recovery copies the regions in order, 1 MiB a second).
        let leg1 = try FileHandle(forWritingTo: URL(fileURLWithPath: fast))
        try leg1.seek(toOffset: (1 << 20) + UInt64(35 * testRegionBytes))
        try leg1.write(contentsOf: Data(pattern(64 << 10, seed: 99)))
        try leg1.close()

        server = try fixture.serve([slow.uri, fast, "--resync-rate", "1M"])
        try fixture.waitFor("the recovery to start") { $0.resync.active }
        // Eight clients at once: while leg 0 has reads in flight, a balanced
        // read would go to leg 1.
        let readers = (0..<8).map { _ in HeldRead(fixture, offset: UInt64(35 * testRegionBytes), count: 64 << 10) }
        for reader in readers {
            #expect(reader.bytes(within: 10) == written[35], "a read during the recovery")
        }
        #expect(try fixture.status().resync.active, "the recovery ran all along")
        #expect(server.stop() == 0)
    }

    @Test func oneDeviceHasNoReadPolicy() throws {
        let fixture = MirrorFixture()
        try run(["truncate", "-s", "16M", fixture.path("one.img")])
        let refused = try fixture.serveRefused([fixture.path("one.img"), "--read-policy", "first"])
        #expect(refused.contains("--read-policy"), "\(refused)")
    }
}

private enum ReadPolicyArgument {
    case balanced, first
    /// balanced is the default: it is asked for by saying nothing.
    var arguments: [String] { self == .first ? ["--read-policy", "first"] : [] }
}

/// A read on a connection of its own, on a thread of its own.
private final class HeldRead: @unchecked Sendable {
    private let finished = DispatchSemaphore(value: 0)
    private var read: [UInt8]?

    init(_ fixture: MirrorFixture, offset: UInt64, count: Int) {
        let socket = fixture.socket
        Thread.detachNewThread { [self] in
            let handle = try? NBDHandle()
            try? handle?.connect(unixSocket: socket)
            read = try? handle?.read(count, at: offset)
            handle?.shutdown()
            finished.signal()
        }
    }

    /// What it read, once done (nil: it failed, or took longer).
    func bytes(within seconds: Double) -> [UInt8]? {
        finished.wait(timeout: .now() + seconds) == .success ? read : nil
    }
}
