import DMIO
import Glibc
import Logging

/// A pass over the mirror's regions, in the background while client I/O
/// goes on (md's sync_action): each run of neighbouring regions is held
/// (writes to it wait, as a copy needs), its action done, and let go. The
/// action is a resync (copy from the first in-sync leg to the legs that
/// need the regions; a copy never puts old data over a newer write) or a
/// scrub (compare the in-sync legs, and rewrite what differs).
final class RegionPass: @unchecked Sendable {
    /// What a pass does to each run of regions it holds.
    enum Action: Sendable {
        /// Copies each run to those of the legs that may lack it.
        case resync(LegTable.Targets)
        case scrub(ScrubAction)

        var name: String {
            switch self {
            case .resync: "resync"
            case .scrub(let scrub): scrub.rawValue
            }
        }

        /// Where the pass's progress is kept: a scrub's next to the last
        /// resync's, each for its own part of the status.
        fileprivate var record: ReferenceWritableKeyPath<RegionPass, Progress> {
            switch self {
            case .resync: \.resyncProgress
            case .scrub: \.scrubProgress
            }
        }
    }

    /// What a scrub found (md's mismatch_cnt, DRBD's oos count after a verify).
    struct Findings: Sendable, Hashable {
        /// Regions whose copies differed, read twice.
        var mismatchedRegions = 0
        /// Bytes at which they differed.
        var mismatchedBytes: UInt64 = 0
        /// Of those regions, the ones rewritten from the winning copy.
        var repairedRegions = 0
        /// Of those, the ones whose copies had no majority (three or more legs).
        var unresolvedRegions = 0
        /// Copies a leg could not read (a leg's region each), rewritten from
        /// a good copy.
        var readErrorsRepaired = 0
        /// Copies a leg could not read and that were not rewritten (no copy
        /// to trust, or the write failed too).
        var readErrorsLeft = 0
        /// Regions that no leg could read.
        var unreadableRegions = 0
    }

    /// What the pass is doing, for the status.
    struct Progress: Sendable {
        var active = false
        var reason = ""
        var regionsDone = 0
        var regionsTotal = 0
        /// Bytes of data copied (a resync) or compared (a scrub).
        var bytesCopied: UInt64 = 0
        var startedAt = ContinuousClock.now
        var finishedAt = ContinuousClock.now
        /// How the last pass ended: "done", "stopped", or why it could not go on.
        var outcome = ""
        /// The last pass's outcome, e.g. "copied 12 regions (6 MiB) in 0.1 s".
        var lastResult = ""
        var findings = Findings()

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
    /// How long a pass held back by the rate limit goes without seeing
    /// whether it is to stop, or its legs changed.
    static let stopCheckInterval = Duration.milliseconds(100)

    /// Bytes a second at most; 0 for no limit.
    let rateLimit: UInt64
    /// When the next run may start, by the rate limit: a run done takes its
    /// length's share of the limit from its own start. So no pass goes
    /// faster than the limit to catch up after a stall (a slow leg, a run
    /// held), nor starts with a burst right after the last one ended (a
    /// pass tried again, a scrub after a resync). The pass thread's alone.
    private var nextTurn = ContinuousClock.now
    private let bitmap: RegionBitmap
    private let regionHash: RegionHash
    private let legs: LegTable
    private let copier: Copier
    private let scrubber: Scrubber
    private let failures: LegFailures
    /// Makes regions' bits durable (marked, and the bitmap committed);
    /// false when the bitmap could not be written.
    private let markDirty: (ClosedRange<Int>) -> Bool
    private let dataBytes: UInt64
    private let events: MirrorEvents
    private let logger: Logger
    private let lock = ConditionLock()
    private var resyncProgress = Progress()
    private var scrubProgress = Progress()

    init(bitmap: RegionBitmap, regionHash: RegionHash, legs: LegTable, copier: Copier, scrubber: Scrubber,
         failures: LegFailures, markDirty: @escaping (ClosedRange<Int>) -> Bool, rateLimit: UInt64,
         events: MirrorEvents, logger: Logger) {
        self.markDirty = markDirty
        self.bitmap = bitmap
        self.events = events
        self.regionHash = regionHash
        self.legs = legs
        self.copier = copier
        self.scrubber = scrubber
        self.failures = failures
        self.rateLimit = rateLimit
        self.logger = logger
        dataBytes = copier.layout.dataBytes
    }

    /// The resync under way, or the last one.
    var current: Progress { lock.withLock { resyncProgress } }
    /// The scrub under way, or the last one.
    var currentScrub: Progress { lock.withLock { scrubProgress } }

    /// Resyncs every region dirty now, for the legs `targets` (those of
    /// them still writable, on the same device, at each region: a leg that
    /// fails or is replaced drops out). Returns whether the pass went
    /// through every region.
    func resync(reason: String, targets: LegTable.Targets, stopping: () -> Bool) -> Bool {
        let longest = max(1, Self.copyBytes / Int(regionHash.regionBytes))
        return run(.resync(targets), reason: reason, runs: Self.runs(of: bitmap.dirtyRegions, longest: longest),
                   stopping: stopping)
    }

    /// A scrub was asked for: until it starts, the status shows it, with
    /// nothing found yet.
    func prepareScrub(_ action: ScrubAction) {
        lock.withLock { scrubProgress = Progress(reason: action.rawValue) }
    }

    /// Scrubs every region, a run at a time, each run small enough that the
    /// copies of all the legs in sync now fit in about `copyBytes`.
    func scrub(_ action: ScrubAction, stopping: () -> Bool) -> Bool {
        let regionCount = copier.layout.regionCount
        let longest = max(1, Self.copyBytes / Int(regionHash.regionBytes) / max(2, legs.snapshot.readable.count))
        let runs = stride(from: 0, to: regionCount, by: longest).map { $0..<min($0 + longest, regionCount) }
        return run(.scrub(action), reason: action.rawValue, runs: runs, stopping: stopping)
    }

    private func run(_ action: Action, reason: String, runs: [Range<Int>], stopping: () -> Bool) -> Bool {
        let regionBytes = regionHash.regionBytes
        let total = runs.reduce(0) { $0 + $1.count }
        let record = action.record
        lock.withLock {
            self[keyPath: record] = Progress(active: true, reason: reason, regionsTotal: total)
        }
        // "resync (rebuild)", "check".
        let title = reason == action.name ? reason : "\(action.name) (\(reason))"
        logger.info("\(title): \(total) regions")
        events.passStarted(action, reason: reason, regions: total,
                           bytes: min(dataBytes, UInt64(total) * UInt64(regionHash.regionBytes)))
        // Told at each whole percent: a hook's RebuildNN at any increment.
        var percentTold = 0
        var buffers = Buffers(bytes: (runs.map(\.count).max() ?? 1) * Int(regionBytes))
        var outcome = "done"
        defer { finish(action, outcome) }
        var loggedAt = ContinuousClock.now
        for run in runs {
            if let end = waitForTurn(action, title: title, loggedAt: &loggedAt, stopping: stopping) {
                outcome = end
                return false
            }
            let offset = UInt64(run.lowerBound) * regionBytes
            let length = min(UInt64(run.count) * regionBytes, dataBytes - offset)
            let started = ContinuousClock.now
            regionHash.startCopy(run)
            let failure = perform(action, run, offset: offset, length: length, buffers: &buffers)
            for write in regionHash.endCopy(run) { write() }
            if let failure {
                outcome = failure
                return false
            }
            if rateLimit > 0 { nextTurn = started + .seconds(Double(length) / Double(rateLimit)) }
            let done = lock.withLock {
                self[keyPath: record].regionsDone += run.count
                self[keyPath: record].bytesCopied += length
                return self[keyPath: record].regionsDone
            }
            if done * 100 / total > percentTold, done < total {
                percentTold = done * 100 / total
                events.passProgress(action, percent: percentTold, regionsDone: done, regions: total)
            }
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

    /// A pass's buffers, each as long as its longest run, one for each leg
    /// read at once, made as they are needed.
    private struct Buffers {
        let bytes: Int
        private var made: [AlignedBytes] = []

        init(bytes: Int) { self.bytes = bytes }

        mutating func take(_ count: Int) -> [UnsafeMutableRawBufferPointer] {
            while made.count < count { made.append(AlignedBytes(count: bytes)) }
            return made.prefix(count).map(\.bytes)
        }
    }

    /// Does `action` to a held run; returns why the pass cannot go on. The
    /// legs are chosen only once the run is held: a leg failed before that
    /// takes no more writes, and its bytes would go over the newer ones
    /// that the other legs took meanwhile.
    private func perform(_ action: Action, _ run: Range<Int>, offset: UInt64, length: UInt64,
                         buffers: inout Buffers) -> String? {
        let snapshot = legs.snapshot
        if let obstacle = obstacle(to: action, snapshot) { return obstacle }
        switch action {
        case .resync(let targets):
            let copyTo = snapshot.writable.filter(targets.contains)
            let source = snapshot.readable[0]
            do {
                let copied = try copier.copy(offset: offset, length: length, from: source, to: copyTo,
                                             through: buffers.take(1)[0])
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
        case .scrub(let scrub):
            let inSync = snapshot.readable
            // While a leg is out, a region rewritten must be dirty first:
            // the leg, re-added, is copied only what the bitmap says.
            let found = scrubber.scrub(run, offset: offset, length: length, legs: inSync,
                                       buffers: buffers.take(inSync.count), repair: scrub == .repair) { [self] region in
                legs.allInSync || markDirty(region...region)
            }
            report(found, of: scrub)
            return nil
        }
    }

    /// Counts, logs and tells what a scrub found in a run; degrades the legs
    /// that failed a rewrite.
    private func report(_ found: Scrubber.Outcome, of scrub: ScrubAction) {
        let regionBytes = regionHash.regionBytes
        for error in found.readErrors {
            legs.countError(error.failure, reading: true)
            let leg = error.failure.leg
            let line = "\(scrub): leg \(leg.index) (\(leg.device.name)) could not read region \(error.region) "
                + "(\(errnoDescription(error.failure.errno))): "
                + (error.repaired ? "rewritten from a leg that could" : "not repaired")
            logger.warning("\(line)")
            events.scrubReadError(leg: leg.index, region: error.region, errno: error.failure.errno, repaired: error.repaired)
        }
        failures.record(found.writeFailures, reading: false)
        for mismatch in found.mismatches {
            let at = "region \(mismatch.region) (offset \(UInt64(mismatch.region) * regionBytes))"
            let legsNamed = { (legs: [Int]) in (legs.count == 1 ? "leg " : "legs ") + legs.map(String.init).joined(separator: ", ") }
            let action = mismatch.repaired ? "rewritten" : scrub == .repair ? "not rewritten (a write failed)" : "left as it is (check)"
            switch mismatch.vote {
            case .majority(let winner, let outvoted):
                let line = "\(scrub): \(at): \(mismatch.bytes) bytes differ; \(legsNamed(outvoted)) outvoted by the "
                    + "majority that holds leg \(winner)'s copy: \(action)"
                logger.warning("\(line)")
            case .firstOfTwo(let winner, let outvoted):
                let line = "\(scrub): \(at): \(mismatch.bytes) bytes differ between legs \(winner) and "
                    + "\(outvoted.map(String.init).joined(separator: ", ")); two legs have no majority: the first "
                    + "in-sync leg's copy (leg \(winner)) wins, \(legsNamed(outvoted)) \(action)"
                logger.warning("\(line)")
            case .none, .agree:
                let line = "\(scrub): \(at): \(mismatch.bytes) bytes differ and no copy has a majority: not repaired; "
                    + "compare the legs (`cmp`) and decide"
                logger.error("\(line)")
            }
            events.scrubMismatch(region: mismatch.region, offset: UInt64(mismatch.region) * regionBytes,
                                 bytes: mismatch.bytes, vote: mismatch.vote, repaired: mismatch.repaired)
        }
        lock.withLock {
            scrubProgress.findings.mismatchedRegions += found.mismatches.count
            scrubProgress.findings.mismatchedBytes += found.mismatches.reduce(0) { $0 + UInt64($1.bytes) }
            scrubProgress.findings.repairedRegions += found.mismatches.count { $0.repaired }
            scrubProgress.findings.unresolvedRegions += found.mismatches.count { $0.vote == .none }
            scrubProgress.findings.readErrorsRepaired += found.readErrors.count { $0.repaired }
            scrubProgress.findings.readErrorsLeft += found.readErrors.count { !$0.repaired }
            scrubProgress.findings.unreadableRegions += found.unreadable
        }
    }

    /// Waits for the next run's turn (`nextTurn`). A run is up to
    /// `copyBytes`, more than a low limit allows in a second, so the wait is
    /// as long as it takes, a slice at a time to see a stop or the legs
    /// change, and to log the progress as often as when copying. Nothing
    /// waits after the last run: its legs are in sync the sooner. Returns
    /// why the pass ends instead.
    private func waitForTurn(_ action: Action, title: String, loggedAt: inout ContinuousClock.Instant,
                             stopping: () -> Bool) -> String? {
        let record = action.record
        while true {
            if ContinuousClock.now - loggedAt >= Self.logInterval {
                loggedAt = ContinuousClock.now
                logger.info("\(title): \(MirrorStatus.Resync(self[keyPath: record], rateLimit: rateLimit).summary)")
            }
            if stopping() { return "stopped" }
            if let obstacle = obstacle(to: action, legs.snapshot) { return obstacle }
            let due = nextTurn - .now
            guard due > .zero else { return nil }
            pause(for: min(due, Self.stopCheckInterval))
        }
    }

    /// Why `action` cannot go on with the legs `snapshot` holds.
    private func obstacle(to action: Action, _ snapshot: LegTable.Snapshot) -> String? {
        switch action {
        case .resync(let targets):
            snapshot.readable.isEmpty || !snapshot.writable.contains(where: targets.contains) ? "no leg left to copy to" : nil
        case .scrub:
            snapshot.readable.count < 2 ? "fewer than two legs in sync" : nil
        }
    }

    private func finish(_ action: Action, _ outcome: String) {
        let record = action.record
        let (summary, progress, reason): (String, Progress, String) = lock.withLock {
            self[keyPath: record].active = false
            self[keyPath: record].finishedAt = ContinuousClock.now
            self[keyPath: record].outcome = outcome
            let progress = self[keyPath: record]
            let mib = Double(progress.bytesCopied) / 1_048_576
            let verb = if case .resync = action { "copied" } else { "checked" }
            var result = "\(progress.reason): \(outcome), \(verb) \(progress.regionsDone) of "
                + "\(progress.regionsTotal) regions (\(formatted(mib)) MiB) in \(formatted(progress.elapsed.seconds)) s"
            if case .scrub = action { result += "; " + progress.findings.summary }
            self[keyPath: record].lastResult = result
            return (result, progress, progress.reason)
        }
        logger.info("\(reason == action.name ? "" : "\(action.name) ")\(summary)")
        events.passFinished(action, outcome: outcome, regionsDone: progress.regionsDone, regions: progress.regionsTotal,
                            findings: { if case .scrub = action { progress.findings } else { nil } }())
    }
}

extension RegionPass.Findings {
    /// "1 region differs (1 byte): 1 rewritten, 0 without a majority; 0 read errors rewritten"
    var summary: String {
        "\(mismatchedRegions) \(mismatchedRegions == 1 ? "region differs" : "regions differ") "
            + "(\(mismatchedBytes) \(mismatchedBytes == 1 ? "byte" : "bytes")): "
            + "\(repairedRegions) rewritten, \(unresolvedRegions) without a majority; "
            + "\(readErrorsRepaired) read errors rewritten"
            + (readErrorsLeft > 0 ? ", \(readErrorsLeft) not" : "")
            + (unreadableRegions > 0 ? ", \(unreadableRegions) regions unreadable" : "")
    }
}
