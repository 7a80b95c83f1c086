import Foundation
import LibNBD
import TestSupport
import Testing

/// `serve --metrics`: the Prometheus text, read with curl and parsed by
/// Debian's python3-prometheus-client (a real parser), as a monitoring
/// system reads it, while libnbd drives the mirror and real faults fail
/// its legs.
@Suite(.serialized) struct MetricsTests {
    static let legSize = "64M"

    /// Scrapes until `condition` holds, for `timeout` seconds at most.
    @discardableResult
    private func waitFor(_ what: String, on path: String, timeout: Double = 1,
                         _ condition: (Scraped) -> Bool) throws -> Scraped {
        let deadline = Date().addingTimeInterval(timeout)
        var last = try Scraped.read(path)
        while !condition(last) {
            guard Date() < deadline else {
                Issue.record("metrics: not within \(timeout) s: \(what)")
                return last
            }
            usleep(20_000)
            last = try Scraped.read(path)
        }
        return last
    }

    @Test func everyMetricIsThereAndCountsWhatTheClientDid() throws {
        let fixture = MirrorFixture()
        let metrics = fixture.path("metrics.sock")
        let server = try fixture.serve([fixture.path("leg0.img"), fixture.path("leg1.img"), "--create", Self.legSize,
                                        "--metrics", "unix:" + metrics, "--resync-rate", "50M"])
        let handle = try fixture.connect()
        let written = try handle.writeRegions(0..<8, seed: 4)
        try handle.expectReadBack(written)
        try handle.flush()

        let scraped = try Scraped.read(metrics)
        let uuid = try fixture.status().uuid
        // The text format wants each family's lines together, under one TYPE (Go's parser refuses a second).
        let text = try run(["curl", "--silent", "--unix-socket", metrics, "http://localhost/metrics"])
        let types = text.split(separator: "\n").filter { $0.hasPrefix("# TYPE ") }.map { $0.split(separator: " ")[2] }
        #expect(Set(types).count == types.count, "a family twice: \(types.sorted())")
        for name in ["dmio_build_info", "dmio_mirror_info", "dmio_leg_info", "dmio_leg_state", "dmio_mirror_legs",
                     "dmio_mirror_degraded", "dmio_bitmap_dirty_regions", "dmio_bitmap_writes", "dmio_leg_out_of_sync_bytes",
                     "dmio_leg_writes_behind",
                     "dmio_resync_active", "dmio_resync_done_bytes", "dmio_resync_total_bytes",
                     "dmio_resync_rate_limit_bytes_per_second", "dmio_leg_read_bytes", "dmio_leg_written_bytes",
                     "dmio_leg_requests", "dmio_leg_request_duration_seconds", "dmio_leg_inflight_requests",
                     "dmio_nbd_connections", "dmio_nbd_requests", "dmio_nbd_request_duration_seconds",
                     "dmio_nbd_request_size_bytes"] {
            #expect(scraped.families[name] != nil, "no metric family \(name)")
        }
        #expect(scraped.families["dmio_nbd_requests"] == "counter")
        #expect(scraped.families["dmio_nbd_request_duration_seconds"] == "histogram")
        let mirror = ["mirror": uuid]
        #expect(scraped.value("dmio_mirror_info", mirror.merging(["region_bytes": "\(512 << 10)"]) { $1 }) == 1)
        #expect(scraped.value("dmio_nbd_connections", mirror) == 1)
        #expect(scraped.value("dmio_nbd_requests_total", mirror.merging(["op": "write"]) { $1 }) == 8)
        #expect(scraped.value("dmio_nbd_requests_total", mirror.merging(["op": "read"]) { $1 }) == 8)
        #expect(scraped.value("dmio_nbd_requests_total", mirror.merging(["op": "flush"]) { $1 }) == 1)
        #expect(scraped.value("dmio_nbd_request_size_bytes_sum", ["op": "write"]) == Double(8 * (64 << 10)))
        #expect(scraped.value("dmio_nbd_request_size_bytes_bucket", ["op": "write", "le": "65536"]) == 8)
        #expect(scraped.value("dmio_nbd_request_size_bytes_bucket", ["op": "write", "le": "32768"]) == 0)
        #expect(scraped.value("dmio_nbd_request_duration_seconds_count", ["op": "write"]) == 8)
        #expect(scraped.value("dmio_resync_rate_limit_bytes_per_second", mirror) == Double(50 << 20))
        #expect(scraped.value("dmio_mirror_degraded", mirror) == 0)
        #expect(scraped.value("dmio_mirror_legs", mirror.merging(["state": "in_sync"]) { $1 }) == 2)
        #expect((scraped.value("dmio_bitmap_writes_total", mirror) ?? 0) >= 1, "8 regions were marked")
        for leg in ["0", "1"] {
            let labels = mirror.merging(["leg": leg]) { $1 }
            #expect(scraped.value("dmio_leg_state", labels.merging(["state": "in_sync"]) { $1 }) == 1)
            #expect(scraped.values("dmio_leg_state", labels).reduce(0, +) == 1, "one state a leg")
            #expect(scraped.value("dmio_leg_info", labels.merging(["kind": "file", "device": fixture.path("leg\(leg).img")]) { $1 }) == 1)
            // Every byte the client wrote, and the metadata besides.
            #expect((scraped.value("dmio_leg_written_bytes_total", labels) ?? 0) >= Double(8 * (64 << 10)))
            #expect(scraped.value("dmio_leg_out_of_sync_bytes", labels) == 0)
            #expect(scraped.value("dmio_leg_inflight_requests", labels) == 0)
        }
        // Reads come from one leg.
        let read = ["0", "1"].map { scraped.value("dmio_leg_read_bytes_total", mirror.merging(["leg": $0]) { $1 }) ?? 0 }
        #expect(read.reduce(0, +) >= Double(8 * (64 << 10)))
        handle.shutdown()
        #expect(server.stop() == 0)
    }

    @Test func aLegThatFailsShowsInTheMetricsAndItsResyncToo() throws {
        let fixture = MirrorFixture()
        let legs = try FailingLegMirror(fixture, errno: "ENOSPC")
        let metrics = fixture.path("metrics.sock")
        let server = try fixture.serve(legs.legs + ["--metrics", "unix:" + metrics])
        let handle = try fixture.connect()
        var written = try handle.writeRegions(0..<2, seed: 5)
        var scraped = try Scraped.read(metrics)
        #expect(scraped.value("dmio_leg_state", ["leg": "1", "state": "in_sync"]) == 1)
        #expect(scraped.value("dmio_leg_info", ["leg": "1", "kind": "nbd"]) == 1)

        legs.failWrites()
        written.merge(try handle.writeRegions(2..<6, seed: 6)) { $1 }
        scraped = try waitFor("leg 1 degraded", on: metrics) {
            $0.value("dmio_leg_state", ["leg": "1", "state": "degraded"]) == 1
        }
        #expect(scraped.value("dmio_leg_state", ["leg": "1", "state": "in_sync"]) == 0)
        #expect(scraped.value("dmio_mirror_degraded") == 1)
        #expect(scraped.value("dmio_mirror_legs", ["state": "degraded"]) == 1)
        #expect((scraped.value("dmio_leg_errors_total", ["leg": "1", "op": "write", "errno": "ENOSPC"]) ?? 0) >= 1,
                "the leg's error, by errno")
        #expect(scraped.values("dmio_leg_errors_total", ["leg": "0"]).isEmpty, "leg 0 failed nothing")
        #expect(scraped.values("dmio_nbd_errors_total").isEmpty, "the client saw no error")
        #expect((scraped.value("dmio_leg_out_of_sync_bytes", ["leg": "1"]) ?? 0) >= Double(4 * (512 << 10)),
                "the regions written while it was out")
        try handle.expectReadBack(written)

        try legs.healWrites()
        try fixture.control(["readd-leg", "1"])
        scraped = try waitFor("leg 1 back in sync", on: metrics, timeout: 10) {
            $0.value("dmio_leg_state", ["leg": "1", "state": "in_sync"]) == 1
        }
        #expect(scraped.value("dmio_mirror_degraded") == 0)
        #expect(scraped.value("dmio_resync_active") == 0)
        #expect((scraped.value("dmio_resync_total_bytes") ?? 0) >= Double(4 * (512 << 10)))
        #expect(scraped.value("dmio_resync_done_bytes") == scraped.value("dmio_resync_total_bytes"))
        #expect(scraped.value("dmio_leg_out_of_sync_bytes", ["leg": "1"]) == 0)
        handle.shutdown()
        #expect(server.stop() == 0)
    }

    @Test func aLegOnAFullTmpfsShowsItsENOSPCWithinASecond() throws {
        let fixture = MirrorFixture()
        let small = try fixture.smallTmpfs("small", size: "4M")
        let metrics = fixture.path("metrics.sock")
        let server = try fixture.serve([fixture.path("leg0.img"), small + "/leg1.img", "--create", Self.legSize,
                                        "--metrics", "unix:" + metrics])
        let handle = try fixture.connect()
        // 64 KiB in each of 100 regions: more than the 4 MiB the leg's tmpfs holds.
        let written = try handle.writeRegions(0..<100, seed: 7)
        let scraped = try waitFor("leg 1 degraded by ENOSPC", on: metrics) {
            $0.value("dmio_leg_state", ["leg": "1", "state": "degraded"]) == 1
        }
        #expect(scraped.value("dmio_leg_state", ["leg": "1", "state": "in_sync"]) == 0)
        #expect((scraped.value("dmio_leg_errors_total", ["leg": "1", "op": "write", "errno": "ENOSPC"]) ?? 0) >= 1,
                "\(scraped.samples.filter { $0.name == "dmio_leg_errors_total" })")
        #expect(scraped.value("dmio_mirror_degraded") == 1)
        #expect(scraped.values("dmio_nbd_errors_total").isEmpty, "the client saw no error")
        try handle.expectReadBack(written)
        handle.shutdown()
        #expect(server.stop() == 0)
    }

    @Test func theEndpointAnswersOnlyWhatItServesAndRefusesBadAddresses() throws {
        let fixture = MirrorFixture()
        let metrics = fixture.path("metrics.sock")
        let server = try fixture.serve([fixture.path("leg0.img"), fixture.path("leg1.img"), "--create", Self.legSize,
                                        "--metrics", "unix:" + metrics])
        func status(_ arguments: [String]) throws -> String {
            try run(["curl", "--silent", "--output", "/dev/null", "--write-out", "%{http_code}",
                     "--unix-socket", metrics] + arguments)
        }
        #expect(try status(["http://localhost/nothing"]) == "404")
        #expect(try status(["-X", "POST", "http://localhost/metrics"]) == "405")
        #expect(try status(["http://localhost/metrics?x=1"]) == "200")
        // Garbage is not HTTP: the connection is refused, the server goes on.
        let garbage = try connectedUnixSocket(metrics)
        _ = "\u{1}\u{2}nonsense\r\n\r\n".withCString { send(garbage, $0, 14, 0) }
        close(garbage)
        #expect(try status(["http://localhost/metrics"]) == "200")
        #expect(answers(fixture.socket))
        #expect(server.stop() == 0)
        #expect(!FileManager.default.fileExists(atPath: metrics), "the socket file goes at the stop")

        let refused = try fixture.serveRefused([fixture.path("leg0.img"), fixture.path("leg1.img"),
                                                "--metrics", "127.0.0.1"])
        #expect(refused.contains("--metrics"), "\(refused)")
        // A place that cannot be listened on is refused before the mirror is opened.
        let plain = fixture.path("plain-file")
        #expect(FileManager.default.createFile(atPath: plain, contents: nil))
        let held = try fixture.serveRefused([fixture.path("leg0.img"), fixture.path("leg1.img"), "--metrics", "unix:" + plain])
        #expect(held.contains("\(plain) exists and is not a socket"), "\(held)")
    }
}
