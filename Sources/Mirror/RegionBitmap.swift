import DMIO

/// The write-intent bitmap (dm-dirty-log): one bit per region, set and made
/// durable before a write touches a clean region, cleared lazily once every
/// leg is in sync and the region has been idle. A set bit means "the legs
/// may differ here": a crash recovery or a re-added leg copies exactly
/// these regions.
///
/// It holds bits only and starts no I/O: `changedPages` says what to write,
/// and `written` what the legs now hold (the mirror's bitmap commit does the
/// writing). Its lock is a leaf: `RegionHash` takes it inside its own.
final class RegionBitmap: @unchecked Sendable {
    static let bitsPerPage = MirrorLayout.slotBytes * 8

    /// A page of the bitmap to write, and the version of its last change.
    struct Page: Sendable {
        let index: Int
        let version: UInt64
        let bytes: [UInt8]
    }

    let regionCount: Int
    private let lock = ConditionLock()
    private var bits: RegionBits
    /// Pages changed in memory and not yet written, with a version that
    /// tells a change made during a commit from one that it carried.
    private var changed: [Int: UInt64] = [:]
    private var nextVersion: UInt64 = 1

    /// A bitmap as read from a leg (`bitmap`), or all clear.
    init(regionCount: Int, bitmap: [UInt8]? = nil) {
        self.regionCount = regionCount
        bits = RegionBits(count: regionCount)
        if let bitmap {
            for region in 0..<regionCount where bitmap[region / 8] & (1 << (region % 8)) != 0 { bits[region] = true }
        }
    }

    private func isSet(_ region: Int) -> Bool { bits[region] }

    private func change(_ region: Int, set: Bool) {
        bits[region] = set
        changed[region / Self.bitsPerPage] = nextVersion
        nextVersion += 1
    }

    /// Whether the region's bit is set and on the legs.
    private func isDurablyDirty(_ region: Int) -> Bool {
        isSet(region) && changed[region / Self.bitsPerPage] == nil
    }

    // MARK: dm-dirty-log's mark, clear, is-clean

    func isDirty(_ region: Int) -> Bool { lock.withLock { isSet(region) } }

    /// Whether every bit of `regions` is set and on the legs: a write there
    /// needs no commit.
    func isDurablyDirty(_ regions: ClosedRange<Int>) -> Bool {
        lock.withLock { regions.allSatisfy(isDurablyDirty) }
    }

    /// Sets the bits of `regions`; returns whether they were all set and on
    /// the legs already (otherwise a commit must carry them first).
    func mark(_ regions: ClosedRange<Int>) -> Bool {
        lock.withLock {
            let durable = regions.allSatisfy(isDurablyDirty)
            for region in regions where !isSet(region) { change(region, set: true) }
            return durable
        }
    }

    /// Sets every bit: a leg that needs a full copy (a replacement).
    func markAll() {
        lock.withLock {
            for region in 0..<regionCount where !isSet(region) { change(region, set: true) }
        }
    }

    /// Clears the bits of those of `regions` that `mayClear` lets go;
    /// returns how many were set.
    func clear(_ regions: some Sequence<Int>, where mayClear: (Int) -> Bool = { _ in true }) -> Int {
        lock.withLock {
            var cleared = 0
            for region in regions where isSet(region) && mayClear(region) {
                change(region, set: false)
                cleared += 1
            }
            return cleared
        }
    }

    /// The regions whose bit is set, in order.
    var dirtyRegions: [Int] {
        lock.withLock { (0..<regionCount).filter(isSet) }
    }

    var dirtyCount: Int {
        lock.withLock { bits.setCount }
    }

    // MARK: What a commit writes (dm-dirty-log's flush, without the I/O)

    /// The pages changed since they were last written.
    func changedPages() -> [Page] {
        lock.withLock {
            changed.sorted { $0.key < $1.key }.map { page, version in
                Page(index: page, version: version, bytes: pageImage(page))
            }
        }
    }

    /// `pages` are on the legs: those not changed since are clean.
    func written(_ pages: [Page]) {
        lock.withLock {
            for page in pages where changed[page.index] == page.version { changed[page.index] = nil }
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

    /// Page `page` is written again with the next commit (a leg missed it).
    func markChanged(_ page: Int) {
        lock.withLock {
            changed[page] = nextVersion
            nextVersion += 1
        }
    }

    /// Page `page` as it is now (a write-mostly leg's copy, written behind).
    func currentPage(_ page: Int) -> [UInt8] {
        lock.withLock { pageImage(page) }
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
