import DMIO

/// The write-intent bitmap (dm-raid1's dirty log and region hash): one bit
/// per region, set and made durable before a write touches a clean region,
/// cleared lazily once every leg is in sync and the region has been idle.
/// A set bit means "the legs may differ here": a crash recovery or a
/// re-added leg copies exactly these regions.
///
/// The log also keeps the in-flight write count of each region and the
/// regions the resync copier holds: a write to a region under copy waits
/// for the copy, and a copy waits for the writes in flight to drain.
///
/// This type holds state only; `persistBitmap` (a group commit of the pages
/// that changed) does the I/O.
final class DirtyLog: @unchecked Sendable {
    static let bitsPerPage = MirrorLayout.slotBytes * 8

    let regionBytes: UInt64
    let regionCount: Int
    private let lock = ConditionLock()
    private var words: [UInt64]
    /// Bitmap pages changed in memory and not yet written, with a version
    /// that tells a change made during a commit from one that it carried.
    private var changedPages: [Int: UInt64] = [:]
    private var nextVersion: UInt64 = 1
    private var inFlight: [Int: Int] = [:]
    /// Regions a write started in, since the cleaner's last two ticks.
    private var recentlyWritten: Set<Int> = []
    private var previouslyWritten: Set<Int> = []
    /// Regions the copier holds, and the writes waiting for them.
    private var copying: Set<Int> = []
    private var heldWrites: [(ClosedRange<Int>, @Sendable () -> Void)] = []
    /// Set by the mirror: writes the bitmap pages that changed.
    var persist: GroupCommit!

    init(regionBytes: UInt32, regionCount: Int, bitmap: [UInt8]? = nil) {
        self.regionBytes = UInt64(regionBytes)
        self.regionCount = regionCount
        words = [UInt64](repeating: 0, count: (regionCount + 63) / 64)
        if let bitmap {
            for region in 0..<regionCount where bitmap[region / 8] & (1 << (region % 8)) != 0 {
                words[region / 64] |= 1 << UInt64(region % 64)
            }
        }
    }

    /// The regions that bytes `offset..<offset+length` of the mirror touch.
    func regions(offset: UInt64, length: UInt64) -> ClosedRange<Int> {
        let first = Int(offset / regionBytes)
        let last = Int((offset + max(length, 1) - 1) / regionBytes)
        return first...last
    }

    private func isSet(_ region: Int) -> Bool { words[region / 64] & (1 << UInt64(region % 64)) != 0 }

    private func change(_ region: Int, set: Bool) {
        if set { words[region / 64] |= 1 << UInt64(region % 64) } else { words[region / 64] &= ~(1 << UInt64(region % 64)) }
        changedPages[region / Self.bitsPerPage] = nextVersion
        nextVersion += 1
    }

    // MARK: Writes

    /// Starts a write to `regions` if their bits are durable and no copy
    /// holds them; returns false, having started nothing, otherwise (then
    /// `beginWrite`). Most writes take this path and need no continuation.
    func tryBeginWrite(_ regions: ClosedRange<Int>) -> Bool {
        lock.withLock {
            if !copying.isEmpty && regions.contains(where: copying.contains) { return false }
            guard regions.allSatisfy(isDurablyDirty) else { return false }
            for region in regions { countStart(region) }
            return true
        }
    }

    /// Whether the region's bit is set and on every leg; lock held.
    private func isDurablyDirty(_ region: Int) -> Bool {
        isSet(region) && changedPages[region / Self.bitsPerPage] == nil
    }

    /// Counts a write starting in `region`; call with the lock held.
    private func countStart(_ region: Int) {
        inFlight[region, default: 0] += 1
        recentlyWritten.insert(region)
    }

    /// Starts a write to `regions`: once the copier has let go of them and
    /// their bits are durable, `then(true)` runs (perhaps before this
    /// returns); `then(false)` if the bitmap could not be written to any leg.
    /// Every start needs its `endWrite`.
    func beginWrite(_ regions: ClosedRange<Int>, then: @escaping @Sendable (Bool) -> Void) {
        enum Next { case go, waitForCommit, held }
        let next: Next = lock.withLock {
            if !copying.isEmpty && regions.contains(where: copying.contains) {
                heldWrites.append((regions, { [self] in beginWrite(regions, then: then) }))
                return .held
            }
            let durable = regions.allSatisfy(isDurablyDirty)
            for region in regions {
                countStart(region)
                if !isSet(region) { change(region, set: true) }
            }
            return durable ? .go : .waitForCommit
        }
        switch next {
        case .go: then(true)
        case .waitForCommit: persist.request(then: then)
        case .held: break
        }
    }

    func endWrite(_ regions: ClosedRange<Int>) {
        lock.withLock {
            var drained = false
            for region in regions {
                let left = inFlight[region, default: 1] - 1
                if left == 0 {
                    inFlight[region] = nil
                    drained = drained || copying.contains(region)
                } else {
                    inFlight[region] = left
                }
            }
            if drained { lock.broadcast() }
        }
    }

    // MARK: The copier

    /// Holds `region` for a copy: later writes to it wait, and this waits
    /// for the writes in flight.
    func holdForCopy(_ region: Int) {
        lock.withLock {
            copying.insert(region)
            while inFlight[region] != nil { lock.wait() }
        }
    }

    func releaseAfterCopy(_ region: Int) {
        let released: [@Sendable () -> Void] = lock.withLock {
            copying.remove(region)
            var released: [@Sendable () -> Void] = []
            heldWrites.removeAll { held in
                guard !held.0.contains(where: copying.contains) else { return false }
                released.append(held.1)
                return true
            }
            return released
        }
        for write in released { write() }
    }

    /// The regions whose bit is set, in order.
    var dirtyRegions: [Int] {
        lock.withLock { (0..<regionCount).filter(isSet) }
    }

    var dirtyCount: Int {
        lock.withLock { words.reduce(0) { $0 + $1.nonzeroBitCount } }
    }

    func isDirty(_ region: Int) -> Bool { lock.withLock { isSet(region) } }

    /// Sets every bit: a leg that needs a full copy (a replacement).
    func markAll() {
        lock.withLock {
            for region in 0..<regionCount where !isSet(region) { change(region, set: true) }
        }
    }

    // MARK: Lazy clearing

    /// Regions that may be cleared once the legs are flushed: dirty, with
    /// no write in flight, none started in the last two ticks. Each call is
    /// a tick.
    func cleanCandidates() -> [Int] {
        lock.withLock {
            let candidates = (0..<regionCount).filter { region in
                isSet(region) && inFlight[region] == nil && !copying.contains(region)
                    && !recentlyWritten.contains(region) && !previouslyWritten.contains(region)
            }
            previouslyWritten = recentlyWritten
            recentlyWritten = []
            return candidates
        }
    }

    /// Clears the candidates that no write has touched since they were
    /// chosen (the legs have been flushed since). Returns how many.
    func clear(_ candidates: [Int]) -> Int {
        lock.withLock {
            var cleared = 0
            for region in candidates
            where isSet(region) && inFlight[region] == nil && !copying.contains(region)
                && !recentlyWritten.contains(region) {
                change(region, set: false)
                cleared += 1
            }
            return cleared
        }
    }

    /// Clears every bit with no write in flight: a clean stop with every leg in sync.
    func clearAll() {
        lock.withLock {
            for region in 0..<regionCount where isSet(region) && inFlight[region] == nil { change(region, set: false) }
        }
    }

    // MARK: Persisting

    /// The bitmap pages to write, with their images and versions.
    func changedPageImages() -> [(page: Int, version: UInt64, bytes: [UInt8])] {
        lock.withLock {
            changedPages.sorted { $0.key < $1.key }.map { page, version in
                (page, version, pageImage(page))
            }
        }
    }

    /// The whole bitmap as it goes on a leg (`bitmapBytes` long): a new,
    /// stale or re-added leg gets all of it, in one write.
    func image(bitmapBytes: UInt64) -> [UInt8] {
        lock.withLock {
            var bytes = [UInt8](repeating: 0, count: Int(bitmapBytes))
            for region in 0..<regionCount where isSet(region) { bytes[region / 8] |= 1 << UInt8(region % 8) }
            return bytes
        }
    }

    /// Pages written durably: those not changed since are clean.
    func persisted(_ pages: [(page: Int, version: UInt64)]) {
        lock.withLock {
            for (page, version) in pages where changedPages[page] == version { changedPages[page] = nil }
        }
    }

    private func pageImage(_ page: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: MirrorLayout.slotBytes)
        let first = page * Self.bitsPerPage
        for region in first..<min(first + Self.bitsPerPage, regionCount) where isSet(region) {
            bytes[(region - first) / 8] |= 1 << UInt8(region % 8)
        }
        return bytes
    }
}
