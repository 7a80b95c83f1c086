import DMIO
import Glibc

/// The copier (dm-kcopyd's job in dm-raid1): copies dirty regions from the
/// first in-sync leg to the legs that need them, one region at a time, while
/// client I/O goes on. A region is held while it is copied: writes to it
/// wait, so that a copy never puts old data over a newer write.
final class Resync: @unchecked Sendable {
    /// What the copier is doing, for the status.
    struct Progress: Sendable {
        var active = false
        var reason = ""
        var regionsDone = 0
        var regionsTotal = 0
        var bytesCopied: UInt64 = 0
        var startedAt: Double = 0
        var finishedAt: Double = 0
        /// The last pass's outcome, e.g. "copied 12 regions (6 MiB) in 0.1 s".
        var lastResult = ""

        var elapsed: Double { (active ? monotonicSeconds() : finishedAt) - startedAt }
        var bytesPerSecond: Double { elapsed > 0 ? Double(bytesCopied) / elapsed : 0 }
        /// Seconds until the pass ends at the speed so far.
        var etaSeconds: Double? {
            guard active, regionsDone > 0 else { return nil }
            return elapsed / Double(regionsDone) * Double(regionsTotal - regionsDone)
        }
    }

    /// How often a running pass logs its progress.
    static let logInterval = 5.0

    private let mirror: Mirror
    /// Bytes a second at most; 0 for no limit.
    let rateLimit: UInt64
    private let lock = ConditionLock()
    private var progress = Progress()

    init(mirror: Mirror, rateLimit: UInt64) {
        self.mirror = mirror
        self.rateLimit = rateLimit
    }

    var current: Progress { lock.withLock { progress } }

    /// Copies every region dirty now to the legs `targets` (those of them
    /// still writable, on the same device, at each region: a leg that fails
    /// or is replaced drops out). Returns whether the pass went through
    /// every region.
    func pass(reason: String, targets: LegTable.Targets, stopping: () -> Bool) -> Bool {
        let regionBytes = mirror.regionHash.regionBytes
        let runs = Self.runs(of: mirror.bitmap.dirtyRegions, longest: max(1, Self.copyBytes / Int(regionBytes)))
        let total = runs.reduce(0) { $0 + $1.count }
        lock.withLock {
            progress = Progress(active: true, reason: reason, regionsTotal: total, startedAt: monotonicSeconds())
        }
        mirror.logger.info("resync (\(reason)): \(total) dirty regions to copy")
        let buffer = AlignedBytes(count: max(Self.copyBytes, Int(regionBytes)))
        var outcome = "done"
        defer { finish(outcome) }
        var loggedAt = monotonicSeconds()
        for run in runs {
            if monotonicSeconds() - loggedAt >= Self.logInterval {
                loggedAt = monotonicSeconds()
                mirror.logger.info("resync (\(reason)): \(mirror.status.resync.summary)")
            }
            if stopping() {
                outcome = "stopped"
                return false
            }
            let offset = UInt64(run.lowerBound) * regionBytes
            let length = min(UInt64(run.count) * regionBytes, mirror.layout.dataBytes - offset)
            if let failure = copyHeld(run, offset: offset, length: length, to: targets, buffer: buffer) {
                outcome = failure
                return false
            }
            lock.withLock {
                progress.regionsDone += run.count
                progress.bytesCopied += length
            }
            throttle()
        }
        return true
    }

    /// Dirty regions next to each other are copied together, up to this
    /// many bytes at a time: fewer, larger I/Os.
    static let copyBytes = 4 << 20

    /// Groups sorted `regions` into runs of neighbours, `longest` at most.
    static func runs(of regions: [Int], longest: Int) -> [Range<Int>] {
        var runs: [Range<Int>] = []
        for region in regions {
            if let last = runs.last, last.upperBound == region, last.count < longest {
                runs[runs.count - 1] = last.lowerBound..<(region + 1)
            } else {
                runs.append(region..<(region + 1))
            }
        }
        return runs
    }

    /// Holds `run`, then copies it from the first in-sync leg to the legs
    /// of `targets` still writable; returns why it could not. The legs are
    /// chosen only once the run is held: a leg failed before that takes no
    /// more writes, and its bytes would go over the newer ones that the
    /// other legs took meanwhile.
    private func copyHeld(_ run: Range<Int>, offset: UInt64, length: UInt64, to targets: LegTable.Targets,
                          buffer: AlignedBytes) -> String? {
        mirror.regionHash.startCopy(run)
        defer { for write in mirror.regionHash.endCopy(run) { write() } }
        let snapshot = mirror.legs.snapshot
        let copyTo = snapshot.writable.filter(targets.contains)
        guard let source = snapshot.readable.first, !copyTo.isEmpty else { return "no leg left to copy to" }
        guard copy(offset: offset, length: length, from: source, to: copyTo, buffer: buffer) else {
            return "source leg \(source.index) failed"
        }
        return nil
    }

    private func copy(offset: UInt64, length: UInt64, from source: LegTable.Leg, to targets: [LegTable.Leg],
                      buffer: AlignedBytes) -> Bool {
        let memory = UnsafeMutableRawBufferPointer(rebasing: buffer.bytes[0..<Int(length)])
        let regions = targets.map { mirror.dataRegion($0, offset: offset, length: length) }
        do {
            let read = try mirror.client.sync(.read, regions: [mirror.dataRegion(source, offset: offset, length: length)],
                                              buffer: memory)
            if let failure = read.failures.first {
                mirror.fail(LegFailure(leg: source, errno: failure.errno), reading: true)
                return false
            }
            let written = try mirror.client.sync(.write, regions: regions, buffer: memory)
            for failure in written.legFailures(targets) { mirror.fail(failure, reading: false) }
            return true
        } catch {
            // DMIO refused the request itself: no leg is to blame.
            mirror.logger.error("resync: region at \(offset) refused: \(error)")
            return false
        }
    }

    /// Sleeps as long as keeps the copy under the rate limit.
    private func throttle() {
        guard rateLimit > 0 else { return }
        let (copied, started) = lock.withLock { (progress.bytesCopied, progress.startedAt) }
        let due = Double(copied) / Double(rateLimit) - (monotonicSeconds() - started)
        if due > 0 { usleep(UInt32(min(due, 1) * 1e6)) }
    }

    private func finish(_ outcome: String) {
        let summary: String = lock.withLock {
            progress.active = false
            progress.finishedAt = monotonicSeconds()
            let mib = Double(progress.bytesCopied) / 1_048_576
            progress.lastResult = "\(progress.reason): \(outcome), copied \(progress.regionsDone) of "
                + "\(progress.regionsTotal) regions (\(formatted(mib)) MiB) in \(formatted(progress.elapsed)) s"
            return progress.lastResult
        }
        mirror.logger.info("resync \(summary)")
    }
}

func monotonicSeconds() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
}

func formatted(_ value: Double) -> String {
    let tenths = Int((value * 10).rounded())
    return "\(tenths / 10).\(tenths % 10)"
}
