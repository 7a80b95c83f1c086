import DMIO
import Glibc
import Synchronization

/// How a metadata write to every leg not degraded went: durable when one
/// leg at least holds it; the legs that failed it are to be degraded like
/// legs that fail a data write (`LegFailures`).
struct MetadataWrite: Sendable {
    let durable: Bool
    let failures: [LegFailure]
    /// Another superblock must follow (a leg newly flagged: see `recorded`).
    var again = false
    /// The superblock's event (a bitmap write has none).
    var event: UInt64?
}

/// Reads and writes the metadata areas of the legs: superblocks and bitmap
/// pages, through DMIO like the data.
final class MetadataStore: @unchecked Sendable {
    let layout: MirrorLayout
    let mirror: MirrorUUID
    private let legs: LegTable
    private let client: DMIOClient
    /// Where a superblock written is told (`metadata written` events).
    private let announce: MirrorEvents
    private let lock = ConditionLock()
    private var events: UInt64
    private var clean = false
    /// What the last superblock written said that a `metadata written`
    /// event tells of: the leg table's version and the clean flag.
    private var told: (version: UInt64, clean: Bool)?
    /// Recorded in every superblock while set (a lease is held).
    private var owner: MirrorOwner?
    /// Once fenced, nothing is written: another server owns the legs.
    private let lease: Lease?
    /// See `Superblock.eventsCleared`; every superblock records it.
    private var eventsCleared: UInt64
    /// The event of the last superblock that some leg took.
    private var durableEvent: UInt64
    /// The leg table version that the superblocks on the legs describe
    /// (read on every write's answer: an atomic, not the lock).
    private let durableVersion = Atomic<UInt64>(0)
    private let bitmapCommits = Atomic<UInt64>(0)
    /// Bitmap pages go to write-mostly legs behind the others' answer, as
    /// their writes do (write-behind on): a first write to a clean region
    /// then waits for no far leg.
    let pagesBehind: BitmapPagesBehind
    private let bitmap: RegionBitmap

    init(layout: MirrorLayout, mirror: MirrorUUID, events: UInt64, eventsCleared: UInt64, legs: LegTable,
         bitmap: RegionBitmap, client: DMIOClient, lease: Lease?, writeBehind: Bool, announce: MirrorEvents) {
        pagesBehind = BitmapPagesBehind(enabled: writeBehind)
        self.bitmap = bitmap
        self.lease = lease
        self.layout = layout
        self.announce = announce
        self.mirror = mirror
        self.events = events
        self.eventsCleared = eventsCleared
        durableEvent = events
        self.legs = legs
        self.client = client
    }

    /// Whether the superblocks record every leg change up to `version`.
    func isDurable(_ version: UInt64) -> Bool { durableVersion.load(ordering: .acquiring) >= version }

    func setClean(_ value: Bool) { lock.withLock { clean = value } }

    func setOwner(_ value: MirrorOwner?) { lock.withLock { owner = value } }

    /// Set by the start around its claim of the legs, before its lease
    /// runs: every metadata write goes.
    private let claiming = Atomic<Bool>(false)
    func claiming(_ value: Bool) { claiming.store(value, ordering: .releasing) }

    /// One superblock write that may go though the lease lapsed: a renewal,
    /// after a read found the legs still this server's. One only: a second
    /// write could fill the other slot too, over a standby's claim.
    private let renewalPermitted = Atomic<Bool>(false)
    func permitRenewal(_ value: Bool) { renewalPermitted.store(value, ordering: .releasing) }

    /// Whether metadata may be written: not once another server may own
    /// the legs (fenced, or the lease lapsed), but for the claim, or a
    /// renewal (`usePermit`: the permit is used up).
    private func mayWrite(orUseRenewalPermit usePermit: Bool = false) -> Bool {
        guard let lease else { return true }
        guard !lease.isFenced else { return false }
        // Used up by the first superblock after it was given, even under a
        // valid lease: one that follows, after a lapse, has none.
        let permitted = usePermit && renewalPermitted.exchange(false, ordering: .acquiringAndReleasing)
        return lease.isValid || claiming.load(ordering: .acquiring) || permitted
    }

    var eventCount: UInt64 { lock.withLock { events } }

    /// The next superblock comes after `event`, found on the legs: one that
    /// the server taken over from wrote late must not stay the newest.
    func advanceEvents(past event: UInt64) { lock.withLock { events = max(events, event) } }

    /// Bitmap writes so far (one a commit, of however many pages).
    var bitmapWrites: UInt64 { bitmapCommits.load(ordering: .relaxed) }

    /// The event of the last superblock that some leg took: every leg in
    /// sync took it, since one that failed it was degraded first (`settled`).
    var lastDurableEvent: UInt64 { lock.withLock { durableEvent } }

    /// A superblock write ended, and the legs that failed it are degraded.
    func settled(_ written: MetadataWrite) {
        guard written.durable, let event = written.event else { return }
        lock.withLock { durableEvent = max(durableEvent, event) }
    }

    /// Bits are cleared of regions whose data every leg holding superblock
    /// `event` holds: the superblocks from now on record it.
    func noteBitsCleared(heldSince event: UInt64) { lock.withLock { eventsCleared = max(eventsCleared, event) } }

    /// See `noteBitsCleared(heldSince:)`.
    var lastClearing: UInt64 { lock.withLock { eventsCleared } }

    /// Writes a new superblock (the next event) to every leg not degraded.
    func writeSuperblocks(then done: @escaping @Sendable (MetadataWrite) -> Void) {
        guard mayWrite(orUseRenewalPermit: true) else { return done(MetadataWrite(durable: false, failures: [])) }
        let recorded = legs.recorded
        let snapshot = recorded.snapshot
        let (event, isClean, cleared, owner): (UInt64, Bool, UInt64, MirrorOwner?) = lock.withLock {
            self.events += 1
            return (self.events, self.clean, eventsCleared, self.owner)
        }
        let targets = snapshot.writable
        let behind = pagesBehind.beginRecord(snapshot)
        let records = recorded.legs.enumerated().map { index, record in
            var record = record
            record.bitmapBehind = targets.contains { $0.index == index && behind.contains(ObjectIdentifier($0.device)) }
            return record
        }
        let slot = MirrorLayout.slotOffset(Int(event % 2))
        // A lease's renewal changes nothing but the event: it is not told.
        let news = lock.withLock {
            defer { told = (snapshot.version, isClean) }
            return told.map { $0.version != snapshot.version || $0.clean != isClean } ?? true
        }
        let gather = Gather(count: targets.count) { [self] failures in
            let durable = failures.count < targets.count
            if durable {
                durableVersion.max(snapshot.version, ordering: .releasing)
                if news { announce.metadataWritten(event: event, legs: targets.count - failures.count) }
            }
            let again = durable && !pagesBehind.recorded(behind)
            done(MetadataWrite(durable: durable, failures: failures, again: again, event: event))
        }
        for leg in targets {
            var superblock = Superblock(mirror: mirror, legIndex: leg.index, events: event,
                                        generation: recorded.generation, clean: isClean, eventsCleared: cleared,
                                        layout: layout, legs: records)
            superblock.owner = owner
            write(superblock.encoded(), at: slot, to: [leg]) { failures in gather.add(failures) }
        }
    }

    /// Writes parts of the bitmap, each starting at a page (and as long as
    /// its bytes), to every leg not degraded: each part is one DMIO write to
    /// all of them but those that get the bitmap behind (`pagesBehind`),
    /// page by page; `done` does not wait for those, whose failures go to
    /// `behindFailed`. Without `behindFailed` every leg gets the parts (the
    /// whole bitmap at the start).
    func writeBitmap(_ pages: [(page: Int, bytes: [UInt8])],
                     behindFailed: (@Sendable ([LegFailure]) -> Void)?,
                     then done: @escaping @Sendable (MetadataWrite) -> Void) {
        let snapshot = legs.snapshot
        guard mayWrite() else { return done(MetadataWrite(durable: false, failures: [])) }
        guard !pages.isEmpty else { return done(MetadataWrite(durable: !snapshot.writable.isEmpty, failures: [])) }
        let numbers = pages.map(\.page)
        let behind = behindFailed == nil ? [] : pagesBehind.claim(numbers, snapshot)
        let targets = snapshot.writable.filter { leg in !behind.contains { $0.leg.device === leg.device } }
        bitmapCommits.add(1, ordering: .relaxed)
        pagesBehind.sendingWithOthers(numbers, to: targets.map(\.device))
        let gather = Gather(count: pages.count) { [self] failures in
            pagesBehind.landedWithOthers(numbers, on: targets.filter { leg in
                !failures.contains { $0.leg.device === leg.device }
            }.map(\.device))
            let failedLegs = Set(failures.map(\.leg.index))
            done(MetadataWrite(durable: failedLegs.count < targets.count, failures: failures))
        }
        for (page, bytes) in pages {
            write(bytes, at: Self.pageOffset(page), to: targets) { gather.add($0) }
        }
        if let behindFailed {
            let bytes = Dictionary(uniqueKeysWithValues: pages.map { ($0.page, $0.bytes) })
            for (leg, now) in behind {
                for page in now {
                    precondition(bytes[page]!.count == MirrorLayout.slotBytes, "a part behind is one page")
                    writeBehind(page, bytes[page]!, to: leg, failed: behindFailed)
                }
            }
        }
    }

    private static func pageOffset(_ page: Int) -> UInt64 {
        MirrorLayout.bitmapOffset + UInt64(page * MirrorLayout.slotBytes)
    }

    /// Writes `bytes`, bitmap page `page`, to a leg that gets the bitmap
    /// behind, and the page as it is then while it changed during the
    /// write. A page that cannot be written, or that changed while the leg
    /// began to get the bitmap with the others, goes with the next commit.
    private func writeBehind(_ page: Int, _ bytes: [UInt8], to leg: LegTable.Leg,
                             failed: @escaping @Sendable ([LegFailure]) -> Void) {
        guard mayWrite() else {
            _ = pagesBehind.ended(page, on: leg.device, failed: true)
            return bitmap.markChanged(page)
        }
        write(bytes, at: Self.pageOffset(page), to: [leg]) { [self] failures in
            if !failures.isEmpty { failed(failures) }
            switch pagesBehind.ended(page, on: leg.device, failed: !failures.isEmpty) {
            case .again: writeBehind(page, bitmap.currentPage(page), to: leg, failed: failed)
            case .withNextCommit: bitmap.markChanged(page)
            case .done: break
            }
        }
    }

    /// One FUA write of `bytes` at `offset` on each leg of `targets`.
    private func write(_ bytes: [UInt8], at offset: UInt64, to targets: [LegTable.Leg],
                       then done: @escaping ([LegFailure]) -> Void) {
        let buffer = AlignedBytes(bytes)
        let regions = targets.map { IORegion(device: $0.device, sector: offset >> 9, count: UInt64(bytes.count) >> 9) }
        do {
            // The shared client, not an event loop's: a commit may outlive the
            // loop that started it (the server stops its loops before the mirror).
            try client.submit(.write, regions: regions, memory: .buffer(buffer.bytes), flags: .fua) { result, _ in
                withExtendedLifetime(buffer) {}
                done(result.legFailures(targets))
            }
        } catch {
            done(targets.map { LegFailure(leg: $0, errno: EIO) })
        }
    }

    /// Reads both superblock slots of `device`, synchronously.
    static func readSlots(_ device: BlockDevice, client: DMIOClient) throws(MirrorError) -> [Superblock.Decoded] {
        let head = try readBytes(device, offset: 0, count: 2 * MirrorLayout.slotBytes, client: client)
        return (0..<2).map { slot in
            Superblock.decode(Array(head[slot * MirrorLayout.slotBytes..<(slot + 1) * MirrorLayout.slotBytes]))
        }
    }

    static func readBytes(_ device: BlockDevice, offset: UInt64, count: Int, client: DMIOClient) throws(MirrorError) -> [UInt8] {
        guard device.size >= offset + UInt64(count) else { return [UInt8](repeating: 0, count: count) }
        let buffer = AlignedBytes(count: count)
        let result: IOResult
        do {
            result = try client.sync(.read, regions: [IORegion(device: device, sector: offset >> 9, count: UInt64(count) >> 9)],
                                     buffer: buffer.bytes)
        } catch {
            throw .open(error)
        }
        if let failure = result.failures.first { throw .metadataIO(leg: device.name, errno: failure.errno) }
        return Array(UnsafeRawBufferPointer(buffer.bytes))
    }

    /// Writes `bytes` at `offset` of every device, synchronously, with FUA.
    static func writeBytes(_ bytes: [UInt8], offset: UInt64, to devices: [BlockDevice], client: DMIOClient) throws(MirrorError) {
        let buffer = AlignedBytes(bytes)
        let regions = devices.map { IORegion(device: $0, sector: offset >> 9, count: UInt64(bytes.count) >> 9) }
        let result: IOResult
        do {
            result = try client.sync(.write, regions: regions, buffer: buffer.bytes, flags: .fua)
        } catch {
            throw .open(error)
        }
        if let failure = result.failures.first {
            throw .metadataIO(leg: devices[failure.region].name, errno: failure.errno)
        }
    }
}

/// A leg that failed a request, and how.
struct LegFailure: Sendable {
    let leg: LegTable.Leg
    let errno: Int32
}

extension IOResult {
    /// The legs that failed a request whose region `i` was on `targets[i]`.
    func legFailures(_ targets: [LegTable.Leg]) -> [LegFailure] {
        failures.isEmpty ? [] : failures.map { LegFailure(leg: targets[$0.region], errno: $0.errno) }
    }
}

/// Counts the parts of a fan-out and calls back once, with every failure,
/// when the last part ends.
final class Gather: @unchecked Sendable {
    private let lock = ConditionLock()
    private var left: Int
    private var failures: [LegFailure] = []
    private let done: ([LegFailure]) -> Void

    init(count: Int, done: @escaping ([LegFailure]) -> Void) {
        left = count
        self.done = done
        if count == 0 { done([]) }
    }

    func add(_ partFailures: [LegFailure]) {
        let finished: [LegFailure]? = lock.withLock {
            failures += partFailures
            left -= 1
            return left == 0 ? failures : nil
        }
        if let finished { done(finished) }
    }
}
