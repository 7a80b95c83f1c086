import DMIO

/// Which legs get the bitmap behind the others' answer, and the pages on
/// their way to them (`MetadataStore` does the writing). A write-mostly leg
/// written behind (`Snapshot.writeMostly`, write-behind on) gets its bitmap
/// pages behind too, but only once the superblocks on the legs say so
/// (`LegRecord.bitmapBehind`), in both slots (a reader that cannot read the
/// newer slot must not find an older one that does not say so): after a
/// crash a start without a leg whose bitmap was not behind then counts
/// every region dirty. The flag stays
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
    /// The legs that the last two superblocks written both name.
    private var recorded: Set<ObjectIdentifier> = []
    /// The legs that the last superblock written names.
    private var lastNamed: Set<ObjectIdentifier> = []
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

    /// A superblock naming `behind` is on the legs. Returns false when
    /// another must follow: it names a leg the one before did not.
    func recorded(_ behind: Set<ObjectIdentifier>) -> Bool {
        lock.withLock {
            defer { lastNamed = behind }
            recorded = behind.intersection(lastNamed)
            return behind.isSubset(of: lastNamed)
        }
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

    /// What follows a page's write behind.
    enum PageEnd {
        /// It changed meanwhile: write it again, as it is now.
        case again
        /// The leg lacks it (the write failed, or the page changed while the
        /// leg began to get the bitmap with the others): the next commit
        /// takes it, with the others.
        case withNextCommit
        case done
    }

    /// A write of `page` to `device` ended.
    func ended(_ page: Int, on device: BlockDevice, failed: Bool) -> PageEnd {
        lock.withLock {
            let key = ObjectIdentifier(device)
            guard var state = legs[key] else { return .done }
            let changed = state.again.remove(page) != nil
            let end: PageEnd = failed || (changed && front.contains(key)) ? .withNextCommit : changed ? .again : .done
            switch end {
            case .again:
                break
            case .withNextCommit:
                state.missing.insert(page)
                state.writing.remove(page)
            case .done:
                state.missing.remove(page)
                state.writing.remove(page)
            }
            legs[key] = state.isEmpty ? nil : state
            lock.broadcast()
            return end
        }
    }

    /// `pages` go to `device` with the other legs: those under way to it
    /// are written again once their write ends (it could land after this
    /// one, with an older image).
    func sendingWithOthers(_ pages: [Int], to devices: [BlockDevice]) {
        lock.withLock {
            guard !legs.isEmpty else { return }
            for key in devices.map(ObjectIdentifier.init) {
                guard var state = legs[key] else { continue }
                state.again.formUnion(pages.filter(state.writing.contains))
                legs[key] = state
            }
        }
    }

    /// `pages` landed on `devices` with the other legs: they no longer miss them.
    func landedWithOthers(_ pages: [Int], on devices: [BlockDevice]) {
        lock.withLock {
            guard !legs.isEmpty else { return }
            for key in devices.map(ObjectIdentifier.init) {
                guard var state = legs[key], !state.missing.isEmpty else { continue }
                state.missing.subtract(pages)
                legs[key] = state.isEmpty ? nil : state
            }
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

    /// `device` is no longer a leg's (it left the mirror, or was let go to
    /// be opened again): what was kept of it goes, so that a device made
    /// later at its address does not find it.
    func forget(_ device: BlockDevice) {
        lock.withLock {
            let key = ObjectIdentifier(device)
            legs[key] = nil
            front.remove(key)
            recorded.remove(key)
            lastNamed.remove(key)
            lock.broadcast()
        }
    }

    // MARK: Waiting

    /// `device` gets the bitmap with the others from now on (`true`), until
    /// called with `false`, though write-mostly (`waitUntilLanded` then
    /// waits for what is on its way: no page is written to it behind again).
    func sendWithOthers(_ device: BlockDevice, _ withOthers: Bool) {
        lock.withLock {
            let key = ObjectIdentifier(device)
            if withOthers { front.insert(key) } else { front.remove(key) }
        }
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
