import CDMIOSupport
import Glibc

/// Counters that any thread adds to and a reader sums (a metrics scrape).
/// A thread adds to the shard of the CPU it runs on, so two cores do not
/// contend for one cache line, and an addition is one uncontended atomic
/// add: no lock, no allocation. The sums are exact once the additions are
/// done; a sum taken meanwhile may miss the ones in progress.
public final class ShardedCounters: @unchecked Sendable {
    /// What the I/O path adds through.
    public let view: View
    private let block: AtomicWords

    public init(count: Int) {
        var shards = 1
        while shards < min(64, Int(dmio_cpu_count())) { shards *= 2 }
        // Whole cache lines a shard.
        let stride = (count + 7) & ~7
        block = AtomicWords(count: shards * stride)
        view = View(words: block.words, shards: shards, stride: stride)
    }

    /// Counter `index`, summed over the shards.
    public func sum(_ index: Int) -> UInt64 {
        (0..<view.shards).reduce(0) { total, shard in total &+ view.words.load(shard * view.stride + index) }
    }

    /// The counters without a reference to the object that owns them, so
    /// that an addition costs no retain and release; valid while it lives.
    public struct View: Sendable {
        fileprivate let words: AtomicWords.Words
        /// A power of two, so that a CPU's shard is a mask away, not a division.
        fileprivate let shards: Int
        /// Counters a shard takes, rounded up to whole cache lines.
        fileprivate let stride: Int

        /// The calling thread's shard, for the additions of one request.
        @inline(__always)
        public func shard() -> AtomicWords.Words {
            words.from((Int(dmio_current_cpu()) & (shards - 1)) * stride)
        }
    }
}

/// What the requests passing one layer did, per operation: how many started
/// and ended, their bytes, their errors by errno, and histograms of their
/// durations and sizes in powers of two (nbdkit's stats filter buckets
/// sizes so). Counted by the layer that sees the requests (a target
/// decorator, a device's bios), read by a metrics exporter.
public final class RequestStatistics: Sendable {
    /// The operations' names, as their index in `start` and `end` counts them.
    public let operations: [String]

    /// The errnos counted apart; others count as `nil` ("other").
    public static let errnos: [Int32] = [EIO, ENOSPC, EDQUOT, EFBIG, EROFS, EPERM, EACCES, EINVAL, EOPNOTSUPP,
                                         EOVERFLOW, ENOMEM, ETIMEDOUT, ECONNRESET, EPIPE, ESHUTDOWN, ENXIO, ENODEV]
    /// Duration bucket `k` holds requests that took at most 2^k µs: 1 µs to
    /// 2^29 µs (about 9 minutes), and the last holds the rest.
    public static let durationBuckets = 31
    /// Size bucket `k` holds requests of at most 2^(k+9) bytes: 512 bytes to
    /// 1 GiB, and the last holds the rest.
    public static let sizeBuckets = 23

    // No slot counts the requests ended: the duration histogram's buckets
    // add up to it, and each atomic addition on the I/O path costs.
    private enum Slot {
        static let started = 0
        static let bytes = 1
        /// Bytes of requests that failed: the size histogram's sum counts them too.
        static let failedBytes = 2
        static let durationNanoseconds = 3
        static let errors = 4
        static let durations = errors + RequestStatistics.errnos.count + 1
        static let sizes = durations + RequestStatistics.durationBuckets
        static let count = sizes + RequestStatistics.sizeBuckets
    }

    private let counters: ShardedCounters
    /// Where the layer counts its requests. It holds no reference to this
    /// object: the layer's owner keeps the statistics for as long as the
    /// layer counts.
    public let recorder: Recorder
    public var countsSizes: Bool { recorder.countsSizes }

    public init(operations: [String], countsSizes: Bool = true) {
        self.operations = operations
        counters = ShardedCounters(count: operations.count * Slot.count)
        recorder = Recorder(counters: counters.view, countsSizes: countsSizes)
        // The clock measures itself once, now rather than on a request.
        _ = Self.now()
    }

    /// Counts requests as they start and end: a clock read and an atomic add
    /// to start, a clock read and three or four atomic adds to end; no lock,
    /// no allocation, no retain.
    public struct Recorder: Sendable {
        fileprivate let counters: ShardedCounters.View
        /// Whether the size histogram is kept (the metrics show the NBD
        /// requests' sizes, not the legs').
        public let countsSizes: Bool

        /// Counts a request of `operation` as started; returns the time to pass to `end`.
        @inline(__always)
        public func start(_ operation: Int) -> UInt64 {
            counters.shard().add(operation * Slot.count + Slot.started)
            return Statistics.now()
        }

        /// Counts the end of a request that `start` returned `startedAt` for.
        @inline(__always)
        public func end(_ operation: Int, bytes: UInt64, errno: Int32, startedAt: UInt64) {
            // Read on another CPU, the clock may be a few nanoseconds behind
            // the start's: a difference that is negative as a signed number
            // took no time (and would overflow the bucket's rounding below).
            let difference = Statistics.now() &- startedAt
            let elapsed = Int64(bitPattern: difference) < 0 ? 0 : difference
            let shard = counters.shard()
            let base = operation * Slot.count
            if errno == 0 {
                shard.add(base + Slot.bytes, bytes)
            } else {
                shard.add(base + Slot.failedBytes, bytes)
                shard.add(base + Slot.errors + (Statistics.errnos.firstIndex(of: errno) ?? Statistics.errnos.count))
            }
            shard.add(base + Slot.durationNanoseconds, elapsed)
            shard.add(base + Slot.durations + Statistics.bucket((elapsed + 999) / 1000, buckets: Statistics.durationBuckets))
            if countsSizes {
                shard.add(base + Slot.sizes + Statistics.bucket((bytes + 511) >> 9, buckets: Statistics.sizeBuckets))
            }
        }

        /// Counts a request that started at `startedAt` (`now()`) and is over
        /// already: one answered within the call.
        public func record(_ operation: Int, bytes: UInt64, errno: Int32, startedAt: UInt64) {
            counters.shard().add(operation * Slot.count + Slot.started)
            end(operation, bytes: bytes, errno: errno, startedAt: startedAt)
        }

        private typealias Statistics = RequestStatistics
    }

    /// The bucket of `value` among `buckets` of at most 2^k each.
    @inline(__always)
    static func bucket(_ value: UInt64, buckets: Int) -> Int {
        value <= 1 ? 0 : min(buckets - 1, UInt64.bitWidth - (value - 1).leadingZeroBitCount)
    }

    /// A monotonic clock in nanoseconds (`dmio_request_clock_ns`: the TSC
    /// where the kernel trusts it), for durations only.
    @inline(__always)
    public static func now() -> UInt64 { UInt64(dmio_request_clock_ns()) }

    /// One operation's counts, summed at one moment.
    public struct Totals: Sendable {
        public var started: UInt64
        public var ended: UInt64
        /// Bytes of the requests that succeeded.
        public var bytes: UInt64
        /// Errors by errno; `nil` for the errnos not counted apart.
        public var errors: [(errno: Int32?, count: UInt64)]
        public var durationSeconds: Double
        /// Requests per bucket (not cumulative), as `durationBuckets` says.
        public var durations: [UInt64]
        /// Bytes of every request, failed ones too.
        public var sizeBytes: UInt64
        /// Requests per bucket (not cumulative), as `sizeBuckets` says;
        /// zeroes unless `countsSizes`.
        public var sizes: [UInt64]

        /// Started and not yet ended (`ended` is summed first: a request
        /// that ends while the sums are taken is never counted as ended only).
        public var inFlight: UInt64 { started > ended ? started - ended : 0 }
    }

    public func totals(_ operation: Int) -> Totals {
        let base = operation * Slot.count
        let slots = { (from: Int, count: Int) in (0..<count).map { self.counters.sum(base + from + $0) } }
        let durations = slots(Slot.durations, Self.durationBuckets)
        let started = counters.sum(base + Slot.started)
        let errorCounts = slots(Slot.errors, Self.errnos.count + 1)
        let bytes = counters.sum(base + Slot.bytes)
        return Totals(
            started: started, ended: durations.reduce(0, &+), bytes: bytes,
            errors: errorCounts.enumerated().compactMap { index, count in
                count == 0 ? nil : (index < Self.errnos.count ? Self.errnos[index] : nil, count)
            },
            durationSeconds: Double(counters.sum(base + Slot.durationNanoseconds)) / 1e9,
            durations: durations,
            sizeBytes: bytes &+ counters.sum(base + Slot.failedBytes),
            sizes: slots(Slot.sizes, Self.sizeBuckets))
    }

    /// The upper bound of duration bucket `k`, in seconds (the last: +Inf).
    public static func durationBound(_ bucket: Int) -> Double {
        bucket == durationBuckets - 1 ? .infinity : Double(UInt64(1) << bucket) / 1e6
    }

    /// The upper bound of size bucket `k`, in bytes (the last: +Inf).
    public static func sizeBound(_ bucket: Int) -> Double {
        bucket == sizeBuckets - 1 ? .infinity : Double(UInt64(1) << (bucket + 9))
    }
}
