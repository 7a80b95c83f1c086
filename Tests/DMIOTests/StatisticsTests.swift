import DMIO
import Foundation
import Glibc
import Testing

/// The counts behind the metrics: what many threads add is summed exactly,
/// and each request lands in the bucket its duration and size belong to.
@Suite struct StatisticsTests {
    @Test func countsFromManyThreadsSumExactly() {
        let statistics = RequestStatistics(operations: ["read", "write"])
        DispatchQueue.concurrentPerform(iterations: 8) { thread in
            for _ in 0..<10_000 {
                let started = statistics.recorder.start(1)
                statistics.recorder.end(1, bytes: 4096, errno: thread == 0 ? ENOSPC : 0, startedAt: started)
            }
        }
        let writes = statistics.totals(1)
        #expect(writes.started == 80_000 && writes.ended == 80_000 && writes.inFlight == 0)
        #expect(writes.bytes == 70_000 * 4096, "failed requests move no bytes")
        #expect(writes.sizeBytes == 80_000 * 4096, "but count in the size histogram")
        #expect(writes.errors.count == 1 && writes.errors[0].errno == ENOSPC && writes.errors[0].count == 10_000)
        #expect(writes.sizes.reduce(0, +) == 80_000 && writes.durations.reduce(0, +) == 80_000)
        #expect(statistics.totals(0).ended == 0, "reads were not touched")
    }

    @Test func requestsLandInTheirPowerOfTwoBuckets() {
        let statistics = RequestStatistics(operations: ["write"])
        let now = RequestStatistics.now()
        // Sizes: 512 B is bucket 0 (at most 512), 513 B bucket 1, 1 MiB bucket 11.
        for bytes: UInt64 in [512, 513, 1 << 20, 1 << 40] {
            statistics.recorder.record(0, bytes: bytes, errno: EBADF, startedAt: now)
        }
        let totals = statistics.totals(0)
        #expect(totals.sizes[0] == 1 && totals.sizes[1] == 1 && totals.sizes[11] == 1)
        #expect(totals.sizes[RequestStatistics.sizeBuckets - 1] == 1, "beyond 2 GiB: the last bucket")
        #expect(RequestStatistics.sizeBound(11) == Double(1 << 20))
        #expect(RequestStatistics.sizeBound(RequestStatistics.sizeBuckets - 1) == .infinity)
        #expect(totals.errors.count == 1 && totals.errors[0].errno == nil, "an errno not counted apart is 'other'")
        // 2.5 µs is bucket 2 (more than 2, at most 4 µs); an hour, the last.
        // (Counted apart: the requests above took a few µs of their own.)
        let timed = RequestStatistics(operations: ["write"])
        timed.recorder.record(0, bytes: 0, errno: 0, startedAt: RequestStatistics.now() - 2_500)
        // Wrapping, as the statistics subtract: on a machine up for less
        // than an hour the clock reads less than an hour.
        timed.recorder.record(0, bytes: 0, errno: 0, startedAt: RequestStatistics.now() &- 3_600_000_000_000)
        let durations = timed.totals(0).durations
        #expect(durations[2] == 1, "\(durations)")
        #expect(durations[RequestStatistics.durationBuckets - 1] == 1, "\(durations)")
        #expect(RequestStatistics.durationBound(2) == 4e-6)
    }

    /// A request that ends on another CPU may read the clock a little
    /// behind its start: it took no time (not 2^64 ns less a little, which
    /// also made the bucket's rounding overflow, and trap, within 999 ns).
    /// The end's reading comes a little after the test's: the starts are
    /// well ahead.
    @Test func aClockReadBehindTheStartCountsNoTime() {
        let statistics = RequestStatistics(operations: ["write"])
        for ahead: UInt64 in [1_000_000, 1_000_000_000, 3_600_000_000_000] {
            statistics.recorder.record(0, bytes: 4096, errno: 0, startedAt: RequestStatistics.now() + ahead)
        }
        let totals = statistics.totals(0)
        #expect(totals.durations[0] == 3, "\(totals.durations)")
        #expect(totals.durationSeconds == 0)
    }
}
