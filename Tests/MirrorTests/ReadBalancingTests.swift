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

    private func randomReads(policy: ReadPolicyArgument) throws -> Served {
        let fixture = MirrorFixture()
        let slowFile = fixture.path("leg0.img")
        let fast = fixture.path("leg1.img")
        try run(["truncate", "-s", "64M", slowFile, fast])
        let slow = try NBDKit(["--filter=delay", "file", slowFile, "rdelay=20ms"])
        try run([dmioNBDExecutable, "create", "--assume-clean", slow.uri, fast])
        let metrics = fixture.path("metrics.sock")
        let server = try fixture.serve([slow.uri, fast, "--metrics", "unix:" + metrics] + policy.arguments)
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
        // At most one read at a time waits for the slow leg (while it has one
        // in flight, the other has fewer): 100 in 2 s, against thousands.
        #expect(served.reads[1] > 2000, "\(served.reads)")
        #expect(served.share < 0.05, "the slow leg served \(served.reads[0]) of \(served.reads.reduce(0, +))")
    }

    @Test func firstReadsTheFirstLegHoweverSlow() throws {
        let served = try randomReads(policy: .first)
        #expect(served.reads[1] == 0, "\(served.reads)")
        #expect(served.reads[0] > 0)
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
