import BlockTargets
import DMIO
import Mirror
import Prometheus
import Synchronization

/// What the metrics are read from: the served target's request statistics
/// (a `StatsTarget` stacked over it), the mirror when a mirror is served,
/// and the server's open connections.
public struct MetricsSources: Sendable {
    public var version: String
    public var requests: RequestStatistics
    public var mirror: Mirror?
    public var connections: @Sendable () -> Int

    public init(version: String, requests: RequestStatistics, mirror: Mirror?, connections: @escaping @Sendable () -> Int) {
        self.version = version
        self.requests = requests
        self.mirror = mirror
        self.connections = connections
    }
}

/// The Prometheus text of one server, made at each scrape: nothing is
/// pushed from the I/O path. Counts come from the statistics the stats
/// decorator and the legs' devices keep (sharded atomics, summed here) and
/// from the mirror's status; they are set in a registry of swift-prometheus,
/// which writes counters and gauges. Histograms are written here
/// (`HistogramFamily`): the registry's take a lock and walk their buckets
/// per observation, which the I/O path does not pay.
///
/// Names follow Prometheus's conventions: the `dmio_` prefix, base units,
/// `_total` counters, `_info` series, labels `mirror` (its UUID) and `leg`
/// (its index); a leg's device is a label of `dmio_leg_info` only.
public final class MetricsExporter: Sendable {
    private let sources: MetricsSources
    private let scrapes = Mutex(Scrape())

    public init(_ sources: MetricsSources) {
        self.sources = sources
    }

    /// The text format (version 0.0.4), as `/metrics` serves it.
    public static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    /// The metrics as they are now.
    public func render() -> [UInt8] {
        scrapes.withLock { scrape in
            scrape.begin()
            var histograms = Histograms()
            scrape.gauge("dmio_build_info", [("version", sources.version)], 1, help: "The dmio-nbd release serving")
            var base: [(String, String)] = []
            if let mirror = sources.mirror {
                let status = mirror.status
                base = [("mirror", status.uuid)]
                addMirror(status, statistics: mirror.legStatistics, to: &scrape, histograms: &histograms)
            }
            scrape.gauge("dmio_nbd_connections", base, Double(sources.connections()),
                         help: "NBD connections open")
            addRequests(sources.requests, labels: base, prefix: "dmio_nbd", errorLabel: "error",
                        to: &scrape, histograms: &histograms)
            return scrape.end(histograms)
        }
    }

    private func addMirror(_ status: MirrorStatus, statistics: [RequestStatistics?], to scrape: inout Scrape,
                           histograms: inout Histograms) {
        let mirror = [("mirror", status.uuid)]
        scrape.gauge("dmio_mirror_info", mirror + [("size_bytes", "\(status.size)"), ("region_bytes", "\(status.regionBytes)")],
                     1, help: "The mirror: its size and region size")
        var counts = Dictionary(uniqueKeysWithValues: LegCondition.allCases.map { ($0, 0) })
        for leg in status.legs {
            let labels = mirror + [("leg", "\(leg.index)")]
            let state = leg.condition
            counts[state, default: 0] += 1
            scrape.gauge("dmio_leg_info", labels + [("device", leg.device), ("kind", kindLabel(leg.kind))], 1,
                         help: "A leg of the mirror: its device, and the kind of device")
            for candidate in LegCondition.allCases {
                scrape.gauge("dmio_leg_state", labels + [("state", candidate.rawValue)], candidate == state ? 1 : 0,
                             help: "1 for the state the leg is in (missing: it could not be opened), else 0")
            }
            scrape.gauge("dmio_leg_out_of_sync_bytes", labels, Double(leg.outOfSyncBytes ?? 0),
                         help: "Bytes the leg lacks: what a resync has yet to copy to it, or what was written while it was out")
            scrape.gauge("dmio_leg_writes_behind", labels, Double(leg.writesBehind ?? 0),
                         help: "Writes answered before this write-mostly leg had them, still outstanding to it")
            guard leg.index < statistics.count, let legStatistics = statistics[leg.index] else { continue }
            scrape.counter("dmio_leg_read_bytes_total", labels, legStatistics.totals(IOOperation.read.rawValue).bytes,
                           help: "Bytes read from the leg")
            scrape.counter("dmio_leg_written_bytes_total", labels, legStatistics.totals(IOOperation.write.rawValue).bytes,
                           help: "Bytes written to the leg (data and metadata)")
            addRequests(legStatistics, labels: labels, prefix: "dmio_leg", errorLabel: "errno",
                        to: &scrape, histograms: &histograms)
        }
        for (state, count) in counts {
            scrape.gauge("dmio_mirror_legs", mirror + [("state", state.rawValue)], Double(count),
                         help: "Legs of the mirror in each state")
        }
        let out = (counts[.degraded] ?? 0) + (counts[.missing] ?? 0) + (counts[.behind] ?? 0)
        scrape.gauge("dmio_mirror_degraded", mirror, out > 0 ? 1 : 0,
                     help: "1 when a leg is out (degraded, missing or behind) and not being copied to, else 0")
        scrape.gauge("dmio_bitmap_dirty_regions", mirror, Double(status.dirtyRegions),
                     help: "Regions marked in the write-intent bitmap")
        scrape.counter("dmio_bitmap_writes_total", mirror, status.bitmapWrites ?? 0,
                       help: "Writes of the write-intent bitmap to the legs (one per commit of marked regions)")
        let regionBytes = UInt64(status.regionBytes)
        let resync = status.resync
        scrape.gauge("dmio_resync_active", mirror, resync.active ? 1 : 0, help: "1 while a resync copies regions, else 0")
        scrape.gauge("dmio_resync_done_bytes", mirror, Double(min(status.size, UInt64(resync.regionsDone) * regionBytes)),
                     help: "Bytes of the current (or last) resync's regions copied")
        scrape.gauge("dmio_resync_total_bytes", mirror, Double(min(status.size, UInt64(resync.regionsTotal) * regionBytes)),
                     help: "Bytes of the current (or last) resync's regions")
        scrape.gauge("dmio_resync_rate_limit_bytes_per_second", mirror, Double(resync.rateLimit ?? 0),
                     help: "The resync's speed limit (--resync-rate); 0 when unlimited")
        // Zero before any scrub: an alert on mismatches needs no special case.
        let scrub = status.scrub
        scrape.gauge("dmio_scrub_active", mirror, scrub?.active == true ? 1 : 0,
                     help: "1 while a check or repair goes through the regions, else 0")
        scrape.gauge("dmio_scrub_done_bytes", mirror, Double(scrub?.bytesChecked ?? 0),
                     help: "Bytes of the mirror the current (or last) check or repair compared")
        scrape.gauge("dmio_scrub_total_bytes", mirror,
                     Double(min(status.size, UInt64(scrub?.regionsTotal ?? 0) * regionBytes)),
                     help: "Bytes of the mirror the current (or last) check or repair goes through")
        let findings: [(String, Int, String)] = [
            ("mismatched_regions", scrub?.mismatchedRegions ?? 0, "Regions whose copies differed (read twice)"),
            ("mismatched_bytes", Int(scrub?.mismatchedBytes ?? 0), "Bytes at which the copies differed"),
            ("repaired_regions", scrub?.repairedRegions ?? 0, "Regions rewritten from the winning copy"),
            ("unresolved_regions", scrub?.unresolvedRegions ?? 0, "Regions whose copies had no majority (not rewritten)"),
            ("read_errors_repaired", scrub?.readErrorsRepaired ?? 0,
             "Copies a leg could not read (a leg's region each), rewritten from the others"),
            ("read_errors_left", scrub?.readErrorsLeft ?? 0, "Copies a leg could not read that were not rewritten"),
            ("unreadable_regions", scrub?.unreadableRegions ?? 0, "Regions no leg could read"),
        ]
        for (name, value, help) in findings {
            scrape.gauge("dmio_scrub_\(name)", mirror, Double(value), help: help + ", in the current (or last) check or repair")
        }
    }

    /// Requests, errors, requests in flight and the histograms of one layer's statistics.
    private func addRequests(_ statistics: RequestStatistics, labels: [(String, String)], prefix: String,
                             errorLabel: String, to scrape: inout Scrape, histograms: inout Histograms) {
        let sizes = statistics.countsSizes
        let durations = "\(prefix)_request_duration_seconds", sizeFamily = "\(prefix)_request_size_bytes"
        histograms.declare(durations, help: "How long requests took, by operation",
                           bounds: (0..<RequestStatistics.durationBuckets).map(RequestStatistics.durationBound))
        if sizes {
            histograms.declare(sizeFamily, help: "Request sizes, by operation",
                               bounds: (0..<RequestStatistics.sizeBuckets).map(RequestStatistics.sizeBound))
        }
        var inFlight: UInt64 = 0
        for (index, operation) in statistics.operations.enumerated() {
            let totals = statistics.totals(index)
            let opLabels = labels + [("op", operation)]
            inFlight &+= totals.inFlight
            scrape.counter("\(prefix)_requests_total", opLabels, totals.ended, help: "Requests done, by operation")
            for (errno, count) in totals.errors {
                scrape.counter("\(prefix)_errors_total", opLabels + [(errorLabel, errno.map(errnoName) ?? "other")], count,
                               help: "Requests that failed, by operation and error")
            }
            histograms.add(durations, opLabels, buckets: totals.durations, sum: totals.durationSeconds)
            if sizes { histograms.add(sizeFamily, opLabels, buckets: totals.sizes, sum: Double(totals.sizeBytes)) }
        }
        scrape.gauge("\(prefix)_inflight_requests", labels, Double(inFlight), help: "Requests started and not yet done")
    }
}

/// `dmio_leg_info`'s kind label for a device kind.
private func kindLabel(_ kind: String?) -> String {
    switch kind {
    case "file": "file"
    case "block device": "block"
    case "NBD export": "nbd"
    default: "unknown"
    }
}

/// One scrape's series in the registry: each is set to its value now, and
/// the series the last scrape had but this one has not (a leg's old
/// device, an error that went away with a restart of the counts) are
/// taken out, so that the text holds only what is true now.
struct Scrape {
    private let registry = PrometheusCollectorRegistry()
    private var gauges: [String: Gauge] = [:]
    private var counters: [String: Counter] = [:]
    private var touched: Set<String> = []

    mutating func begin() { touched = [] }

    /// Names here are whole (their unit in them): no part is added.
    private static func descriptor(_ name: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
    }

    mutating func gauge(_ name: String, _ labels: [(String, String)], _ value: Double, help: String) {
        let key = Self.key(name, labels)
        touched.insert(key)
        if gauges[key] == nil { gauges[key] = registry.makeGauge(descriptor: Self.descriptor(name, help), labels: labels) }
        gauges[key]!.set(to: value)
    }

    mutating func counter(_ name: String, _ labels: [(String, String)], _ value: UInt64, help: String) {
        let key = Self.key(name, labels)
        touched.insert(key)
        if counters[key] == nil { counters[key] = registry.makeCounter(descriptor: Self.descriptor(name, help), labels: labels) }
        // Set, not added to: the value is the total the statistics hold now.
        counters[key]!.reset()
        counters[key]!.increment(by: Int64(clamping: value))
    }

    /// The registry's text and then the histograms'.
    mutating func end(_ histograms: Histograms) -> [UInt8] {
        for (key, gauge) in gauges where !touched.contains(key) {
            registry.unregisterGauge(gauge)
            gauges[key] = nil
        }
        for (key, counter) in counters where !touched.contains(key) {
            registry.unregisterCounter(counter)
            counters[key] = nil
        }
        var text: [UInt8] = []
        registry.emit(into: &text)
        histograms.write(into: &text)
        return text
    }

    private static func key(_ name: String, _ labels: [(String, String)]) -> String {
        labels.reduce(name) { "\($0)\u{0}\($1.0)=\($1.1)" }
    }
}

/// The histogram families of one scrape, each once, with every series of
/// it (one per leg and operation): the text format wants a family's lines
/// together, under one HELP and TYPE.
struct Histograms {
    private var families: [HistogramFamily] = []

    /// Adds the family `name` unless it is there already.
    mutating func declare(_ name: String, help: String, bounds: [Double]) {
        guard !families.contains(where: { $0.name == name }) else { return }
        families.append(HistogramFamily(name: name, help: help, bounds: bounds))
    }

    mutating func add(_ name: String, _ labels: [(String, String)], buckets: [UInt64], sum: Double) {
        guard let index = families.firstIndex(where: { $0.name == name }) else {
            preconditionFailure("histogram \(name) not declared")
        }
        families[index].add(labels, buckets: buckets, sum: sum)
    }

    func write(into text: inout [UInt8]) {
        for family in families { family.write(into: &text) }
    }
}
