import DMIO

/// Which legs get the bitmap behind the others' answer, and the pages on
/// their way to them (`MetadataStore` does the writing). A write-mostly leg
/// written behind (`Snapshot.writeMostly`, write-behind on) gets its bitmap
/// pages behind too, but only once a superblock on the legs says so
/// (`LegRecord.bitmapBehind`): after a crash a start without a leg whose
/// bitmap was not behind then counts every region dirty. The flag stays
/// while any page is on its way to the leg or failed to reach it.
///
/// At most one write per page and leg is on its way, since a leg's server
/// may reorder the writes it holds and an older image must not land after
/// a newer one; a page changed meanwhile is written again, as it is then,
/// once that write ends. Its lock is a leaf.
final class BitmapPagesBehind: @unchecked Sendable {
    private struct Pages {
        var writing: Set<Int> = []
        var again: Set<Int> = []
        /// Pages that could not be written to the leg (it failed them and
        /// stayed, or nothing could be written then): it lacks them until a
        /// later write of each lands.
        var missing: Set<Int> = []

        var isEmpty: Bool { writing.isEmpty && again.isEmpty && missing.isEmpty }
    }

    private let lock = ConditionLock()
    private var legs: [ObjectIdentifier: Pages] = [:]
    /// Off from the stop on (and when write-behind is off).
    private var enabled: Bool
    /// What the superblocks on the legs say.
    private var recorded: Set<ObjectIdentifier> = []
    /// Legs that get the bitmap with the others from now on, though still
    /// write-mostly (`set-leg --no-write-mostly` under way).
    private var front: Set<ObjectIdentifier> = []

    init(enabled: Bool) {
        self.enabled = enabled
    }

    // MARK: What the superblocks say

    /// The legs of `snapshot` whose superblock entry says their bitmap is
    /// behind, for a superblock about to be written: until it is durable
    /// (`recorded`), only legs the last one named and this one names too get
    /// pages behind.
    func beginRecord(_ snapshot: LegTable.Snapshot) -> Set<ObjectIdentifier> {
        lock.withLock {
            let behind = behindLocked(snapshot)
            recorded.formIntersection(behind)
            return behind
        }
    }

    /// The superblocks naming `behind` are on the legs.
    func recorded(_ behind: Set<ObjectIdentifier>) {
        lock.withLock { recorded = behind }
    }

    /// Whether the superblocks name other legs than they would now: the
    /// next superblock puts it right.
    func isRecordWrong(_ snapshot: LegTable.Snapshot) -> Bool {
        lock.withLock { recorded != behindLocked(snapshot) }
    }

    private func behindLocked(_ snapshot: LegTable.Snapshot) -> Set<ObjectIdentifier> {
        let going = Set(goingLocked(snapshot).map { ObjectIdentifier($0.device) })
        return Set(snapshot.writable.map { ObjectIdentifier($0.device) }.filter { going.contains($0) || legs[$0] != nil })
    }

    private func goingLocked(_ snapshot: LegTable.Snapshot) -> [LegTable.Leg] {
        enabled ? snapshot.writeMostly.filter { !front.contains(ObjectIdentifier($0.device)) } : []
    }

    // MARK: Pages

    /// The legs of `snapshot` that get `pages` behind, with the pages to
    /// write to each now (the others go once their write under way ends).
    func claim(_ pages: [Int], _ snapshot: LegTable.Snapshot) -> [(leg: LegTable.Leg, pages: [Int])] {
        lock.withLock {
            goingLocked(snapshot).filter { recorded.contains(ObjectIdentifier($0.device)) }.map { leg in
                let key = ObjectIdentifier(leg.device)
                var state = legs[key, default: Pages()]
                let now = pages.filter { state.writing.insert($0).inserted }
                state.again.formUnion(pages.filter { !now.contains($0) })
                legs[key] = state
                return (leg, now)
            }
        }
    }

    /// A write of `page` to `device` ended; returns whether to write the
    /// page again (it changed meanwhile, and the write did not fail).
    func ended(_ page: Int, on device: BlockDevice, failed: Bool) -> Bool {
        lock.withLock {
            let key = ObjectIdentifier(device)
            guard var state = legs[key] else { return false }
            let again = state.again.remove(page) != nil
            if failed {
                state.missing.insert(page)
            } else {
                state.missing.remove(page)
            }
            if again && !failed {
                legs[key] = state
                return true
            }
            state.writing.remove(page)
            legs[key] = state.isEmpty ? nil : state
            lock.broadcast()
            return false
        }
    }

    /// `pages` go to `device` with the other legs: those under way to it
    /// are written again once their write ends (it could land after this
    /// one, with an older image).
    func sendingWithOthers(_ pages: [Int], to device: BlockDevice) {
        lock.withLock {
            let key = ObjectIdentifier(device)
            guard var state = legs[key] else { return }
            state.again.formUnion(pages.filter(state.writing.contains))
            legs[key] = state
        }
    }

    /// `pages` landed on `device` with the other legs: it no longer misses them.
    func landedWithOthers(_ pages: [Int], on device: BlockDevice) {
        lock.withLock {
            let key = ObjectIdentifier(device)
            guard var state = legs[key], !state.missing.isEmpty else { return }
            state.missing.subtract(pages)
            legs[key] = state.isEmpty ? nil : state
        }
    }

    /// `device` got the whole bitmap with the others (brought in again).
    func landedWhole(on device: BlockDevice) {
        lock.withLock {
            guard let state = legs[ObjectIdentifier(device)], state.writing.isEmpty else { return }
            legs[ObjectIdentifier(device)] = nil
            lock.broadcast()
        }
    }

    // MARK: Waiting

    /// `device` gets the bitmap with the others from now on (`true`), until
    /// called with `false`; blocks until its pages under way have landed.
    func sendWithOthers(_ device: BlockDevice, _ withOthers: Bool) {
        lock.withLock {
            let key = ObjectIdentifier(device)
            if withOthers { front.insert(key) } else { front.remove(key) }
        }
        if withOthers { waitUntilLanded(device) }
    }

    /// No leg gets the bitmap behind from now on; blocks until every page
    /// under way has landed. At the stop: its last commits must be on every
    /// leg when the superblocks say it stopped cleanly.
    func stop() {
        lock.withLock { enabled = false }
        waitUntilLanded(nil)
    }

    /// Blocks until no page is under way to `device` (to any, if nil).
    func waitUntilLanded(_ device: BlockDevice?) {
        lock.withLock {
            func underWay(_ state: Pages?) -> Bool { state.map { !$0.writing.isEmpty } ?? false }
            while device.map({ underWay(legs[ObjectIdentifier($0)]) }) ?? legs.values.contains(where: { underWay($0) }) {
                lock.wait()
            }
        }
    }
}
