import DMIO
import Glibc
import Logging

/// A pass over the mirror's regions, in the background while client I/O
/// goes on (md's sync_action): each run of neighbouring regions is held
/// (writes to it wait, as a copy needs), its action done, and let go. The
/// action is a resync: copy from the first in-sync leg to the legs that
/// need the regions. A copy never puts old data over a newer write.
final class RegionPass: @unchecked Sendable {
    /// What a pass does to each region it holds (md's sync_action values;
    /// check and repair come with scrub).
    enum Action: Sendable {
        /// Copies each region to the legs that may lack it.
        case resync
    }

    /// What the pass is doing, for the status.
    struct Progress: Sendable {
        var active = false
        var reason = ""
        var regionsDone = 0
        var regionsTotal = 0
        var bytesCopied: UInt64 = 0
        var startedAt = ContinuousClock.now
        var finishedAt = ContinuousClock.now
        /// The last pass's outcome, e.g. "copied 12 regions (6 MiB) in 0.1 s".
        var lastResult = ""

        var elapsed: Duration { (active ? ContinuousClock.now : finishedAt) - startedAt }
        var bytesPerSecond: Double { elapsed > .zero ? Double(bytesCopied) / elapsed.seconds : 0 }
        /// Seconds until the pass ends at the speed so far.
        var etaSeconds: Double? {
            guard active, regionsDone > 0 else { return nil }
            return elapsed.seconds / Double(regionsDone) * Double(regionsTotal - regionsDone)
        }
    }

    /// How often a running pass logs its progress.
    static let logInterval = Duration.seconds(5)
    /// Dirty regions next to each other are copied together, up to this
    /// many bytes at a time: fewer, larger I/Os.
    static let copyBytes = 4 << 20

    /// Bytes a second at most; 0 for no limit.
    let rateLimit: UInt64
    private let bitmap: RegionBitmap
    private let regionHash: RegionHash
    private let legs: LegTable
    private let copier: Copier
    private let failures: LegFailures
    private let dataBytes: UInt64
    private let events: MirrorEvents
    private let logger: Logger
    private let lock = ConditionLock()
    private var progress = Progress()

    init(bitmap: RegionBitmap, regionHash: RegionHash, legs: LegTable, copier: Copier, failures: LegFailures,
         rateLimit: UInt64, events: MirrorEvents, logger: Logger) {
        self.bitmap = bitmap
        self.events = events
        self.regionHash = regionHash
        self.legs = legs
        self.copier = copier
        self.failures = failures
        self.rateLimit = rateLimit
        self.logger = logger
        dataBytes = copier.layout.dataBytes
    }

    var current: Progress { lock.withLock { progress } }

    /// Does `action` to every region dirty now, for the legs `targets`
    /// (those of them still writable, on the same device, at each region: a
    /// leg that fails or is replaced drops out). Returns whether the pass
    /// went through every region.
    func run(_ action: Action, reason: String, targets: LegTable.Targets, stopping: () -> Bool) -> Bool {
        let regionBytes = regionHash.regionBytes
        let runs = Self.runs(of: bitmap.dirtyRegions, longest: max(1, Self.copyBytes / Int(regionBytes)))
        let total = runs.reduce(0) { $0 + $1.count }
        lock.withLock {
            progress = Progress(active: true, reason: reason, regionsTotal: total)
        }
        logger.info("resync (\(reason)): \(total) dirty regions to copy")
        events.resyncStarted(reason: reason, regions: total,
                             bytes: min(dataBytes, UInt64(total) * UInt64(regionHash.regionBytes)))
        // Told at each whole percent: a hook's RebuildNN at any increment.
        var percentTold = 0
        let buffer = AlignedBytes(count: max(Self.copyBytes, Int(regionBytes)))
        var outcome = "done"
        defer { finish(outcome) }
        var loggedAt = ContinuousClock.now
        for run in runs {
            if ContinuousClock.now - loggedAt >= Self.logInterval {
                loggedAt = ContinuousClock.now
                logger.info("resync (\(reason)): \(MirrorStatus.Resync(current, rateLimit: rateLimit).summary)")
            }
            if stopping() {
                outcome = "stopped"
                return false
            }
            let offset = UInt64(run.lowerBound) * regionBytes
            let length = min(UInt64(run.count) * regionBytes, dataBytes - offset)
            regionHash.startCopy(run)
            let failure = perform(action, offset: offset, length: length, for: targets, buffer: buffer)
            for write in regionHash.endCopy(run) { write() }
            if let failure {
                outcome = failure
                return false
            }
            let done = lock.withLock {
                progress.regionsDone += run.count
                progress.bytesCopied += length
                return progress.regionsDone
            }
            if done * 100 / total > percentTold, done < total {
                percentTold = done * 100 / total
                events.resyncProgress(percent: percentTold, regionsDone: done, regions: total)
            }
            throttle()
        }
        return true
    }

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

    /// Does `action` to a held run; returns why the pass cannot go on. The
    /// legs are chosen only once the run is held: a leg failed before that
    /// takes no more writes, and its bytes would go over the newer ones
    /// that the other legs took meanwhile.
    private func perform(_ action: Action, offset: UInt64, length: UInt64, for targets: LegTable.Targets,
                         buffer: AlignedBytes) -> String? {
        switch action {
        case .resync:
            let snapshot = legs.snapshot
            let copyTo = snapshot.writable.filter(targets.contains)
            guard let source = snapshot.readable.first, !copyTo.isEmpty else { return "no leg left to copy to" }
            do {
                let copied = try copier.copy(offset: offset, length: length, from: source, to: copyTo,
                                             through: buffer.bytes)
                if let failure = copied.sourceFailure {
                    failures.record([failure], reading: true)
                    return "source leg \(source.index) failed"
                }
                failures.record(copied.destinationFailures, reading: false)
                return nil
            } catch {
                // DMIO refused the request itself: no leg is to blame.
                logger.error("resync: region at \(offset) refused: \(error)")
                return "source leg \(source.index) failed"
            }
        }
    }

    /// Sleeps as long as keeps the pass under the rate limit.
    private func throttle() {
        guard rateLimit > 0 else { return }
        let (copied, started) = lock.withLock { (progress.bytesCopied, progress.startedAt) }
        let due = Duration.seconds(Double(copied) / Double(rateLimit)) - (ContinuousClock.now - started)
        if due > .zero { pause(for: min(due, .seconds(1))) }
    }

    private func finish(_ outcome: String) {
        let (summary, done, total): (String, Int, Int) = lock.withLock {
            progress.active = false
            progress.finishedAt = ContinuousClock.now
            let mib = Double(progress.bytesCopied) / 1_048_576
            progress.lastResult = "\(progress.reason): \(outcome), copied \(progress.regionsDone) of "
                + "\(progress.regionsTotal) regions (\(formatted(mib)) MiB) in \(formatted(progress.elapsed.seconds)) s"
            return (progress.lastResult, progress.regionsDone, progress.regionsTotal)
        }
        logger.info("resync \(summary)")
        events.resyncFinished(outcome: outcome, regionsDone: done, regions: total)
    }
}
