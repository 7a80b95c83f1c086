import DMIO
import Glibc

/// The legs and their health: which are read, which are written, and why a
/// leg left the mirror. Requests take a snapshot (two arrays, replaced on
/// every change) so that the I/O path holds the lock only to copy a
/// reference. Every change that could leave no in-sync leg is checked and
/// made under one lock.
final class LegTable: @unchecked Sendable {
    struct Member {
        /// The path or URI the leg is opened by.
        var name: String
        /// nil when the leg could not be opened (it is then degraded).
        var device: BlockDevice?
        var uuid: MirrorUUID
        var state: LegState
        /// What failed the leg, or the last error it returned.
        var errno: Int32 = 0
        /// Why a degraded leg left.
        var cause: LegCause = .unknown
        /// The generation a degraded leg was failed in (see `Superblock.generation`).
        var failedGeneration: UInt64 = 0
        var readErrors = 0
        var writeErrors = 0
        /// A rebuilding leg that takes leg `replaces`'s place once in sync.
        var replaces: Int?
        /// Read only when no other leg in sync can be; written behind the
        /// others with `--write-behind` (md's write-mostly).
        var writeMostly = false
    }

    /// A member as a change tells it (the mirror's events): nothing that
    /// holds its device open, which a leg re-added must open anew.
    struct Told {
        let uuid: MirrorUUID
        let name: String
        let condition: LegCondition
        let cause: LegCause
        let errno: Int32

        init(_ member: Member) {
            uuid = member.uuid
            name = member.name
            condition = member.condition
            cause = member.cause
            errno = member.errno
        }
    }

    /// A leg as a request sees it.
    struct Leg {
        let index: Int
        let device: BlockDevice
        var writeMostly = false
    }

    /// The legs a request may use, at one moment.
    final class Snapshot: Sendable {
        /// Counts the table's changes: a request that saw this snapshot may
        /// answer once the superblocks record this version.
        let version: UInt64
        /// In-sync legs, in order, write-mostly ones last: reads go to one
        /// the read policy picks among the first `readFirst`; a resync and
        /// a scrub's tie copy from the first.
        let readable: [Leg]
        /// How many of `readable` are read before a write-mostly leg is:
        /// those not write-mostly, or all when every one is.
        let readFirst: Int
        /// Those legs: the ones reads go to, and writes are answered from.
        var readFirstLegs: ArraySlice<Leg> { readable.prefix(readFirst) }
        /// In-sync and rebuilding legs: writes go to all of them.
        let writable: [Leg]
        /// The write-mostly legs written (in sync or rebuilding) while a
        /// leg that is not write-mostly is in sync: the legs a write may be
        /// answered without (write-behind).
        let writeMostly: [Leg]
        /// Whether `writeMostly` has a leg: asked by every write.
        let hasWriteMostly: Bool

        init(_ members: [Member], version: UInt64) {
            self.version = version
            let legs = members.indices.compactMap { index in
                members[index].device.map { Leg(index: index, device: $0, writeMostly: members[index].writeMostly) }
            }
            let inSync = legs.filter { members[$0.index].state == .inSync }
            let preferred = inSync.filter { !$0.writeMostly }
            readable = preferred + inSync.filter(\.writeMostly)
            readFirst = preferred.isEmpty ? inSync.count : preferred.count
            writable = legs.filter { members[$0.index].state != .degraded }
            writeMostly = preferred.isEmpty ? [] : writable.filter(\.writeMostly)
            hasWriteMostly = !writeMostly.isEmpty
        }

        func isReadable(_ leg: Leg) -> Bool { readable.contains { $0.index == leg.index && $0.device === leg.device } }
    }

    private let lock = ConditionLock()
    private var members: [Member]
    private var current: Snapshot
    private var version: UInt64 = 0
    /// The mirror's generation: a new one each time a leg leaves.
    private var generation: UInt64
    /// Set when a rebuilding leg took a change that no in-sync leg holds:
    /// the rebuild pass under way may have copied that region already, so
    /// it must not put the leg in sync.
    private var rebuildSpoiled = false
    /// The members as the last change told them, and who is told of each
    /// change (the mirror's events), under the lock: changes arrive in order.
    private var told: [Told]
    private let onChange: @Sendable (_ before: [Told], _ after: [Told]) -> Void

    init(_ members: [Member], generation: UInt64,
         onChange: @escaping @Sendable (_ before: [Told], _ after: [Told]) -> Void = { _, _ in }) {
        self.members = members
        self.generation = generation
        self.onChange = onChange
        told = members.map(Told.init)
        current = Snapshot(members, version: 0)
    }

    /// Publishes the members as they are now; call with the lock held.
    private func changed() {
        version += 1
        current = Snapshot(members, version: version)
        let now = members.map(Told.init)
        onChange(told, now)
        told = now
    }

    var snapshot: Snapshot { lock.withLock { current } }
    var count: Int { lock.withLock { members.count } }

    func member(_ index: Int) -> Member { lock.withLock { members[index] } }
    var all: [Member] { lock.withLock { members } }

    var allInSync: Bool { lock.withLock { members.allSatisfy { $0.state == .inSync } } }

    private var inSyncCount: Int { members.filter { $0.state == .inSync && $0.device != nil }.count }

    /// Records a failed request on `leg`. The leg becomes degraded unless it
    /// is the last in-sync leg: like md, a mirror never fails its last copy
    /// of the data; that leg's errors go to the client instead. A failure
    /// from a device the leg no longer uses (re-added or replaced since) is
    /// ignored. Returns whether the leg's state changed.
    @discardableResult
    func fail(_ leg: Leg, errno: Int32, reading: Bool) -> Bool {
        lock.withLock { failLocked(leg, errno: errno, reading: reading) }
    }

    private func failLocked(_ leg: Leg, errno: Int32, reading: Bool) -> Bool {
        guard let index = position(of: leg) else { return false }
        if reading { members[index].readErrors += 1 } else { members[index].writeErrors += 1 }
        members[index].errno = errno
        switch members[index].state {
        case .degraded where members[index].cause == .behind:
            // A leg pulled ahead whose writes behind fail is out for that
            // now: not caught up, but re-added as any failed leg is (by the
            // retries, for a lost connection).
            members[index].cause = reading ? .read : .write
            changed()
            return false
        case .degraded:
            return false
        case .inSync where inSyncCount == 1:
            return false
        case .inSync, .rebuilding:
            degradeLocked(index, cause: reading ? .read : .write)
            return true
        }
    }

    /// Where `leg` is now: at its index, or elsewhere when legs were added
    /// or removed since it was seen; nil when its device left the mirror
    /// (re-added, replaced or removed since); lock held.
    private func position(of leg: Leg) -> Int? {
        if leg.index < members.count && members[leg.index].device === leg.device { return leg.index }
        return members.firstIndex { $0.device === leg.device }
    }

    /// Counts an error that does not degrade the leg: one a scrub rewrote
    /// from another leg.
    func countError(_ failure: LegFailure, reading: Bool) {
        lock.withLock {
            guard let index = position(of: failure.leg) else { return }
            if reading { members[index].readErrors += 1 } else { members[index].writeErrors += 1 }
            members[index].errno = failure.errno
        }
    }

    /// The leg keeps the generation it has; the legs that go on get a new
    /// one, so that the leg shows, when it comes back, whether a server
    /// wrote to it meanwhile.
    private func degradeLocked(_ index: Int, cause: LegCause) {
        members[index].state = .degraded
        // A replacement that fails replaces nothing: it is one leg more, out.
        members[index].replaces = nil
        members[index].cause = cause
        members[index].failedGeneration = generation
        generation = Superblock.newGeneration()
        changed()
    }

    /// How a change (a write, a zeroing, a discard, a flush) sent to the
    /// writable legs of a snapshot ended.
    struct Settlement {
        /// The legs that it failed on and that are degraded for it.
        var degraded: [Leg]
        /// Whether a leg in sync now holds it: only then did it succeed.
        var held: Bool
        /// The leg table's version once the failures are recorded.
        var version: UInt64
    }

    /// Records the legs that failed a change sent to `legs` (a snapshot's
    /// writable legs, or those a write-behind waits for), then says whether
    /// a leg that took it is in sync now. Both
    /// under one lock: the legs may have changed since the change went out
    /// (a leg failed by the operator or by another request, a rebuild
    /// finished), and a leg whose failure is refused (the last in-sync leg)
    /// stays in sync without the change, whose error must then reach the
    /// client.
    func settle(_ failures: [LegFailure], sentTo legs: [Leg]) -> Settlement {
        lock.withLock {
            let degraded = failures.filter { failLocked($0.leg, errno: $0.errno, reading: false) }.map(\.leg)
            let failed = Set(failures.map(\.leg.index))
            let holders = legs.filter { !failed.contains($0.index) }.compactMap(position(of:))
            let held = holders.contains { members[$0].state == .inSync }
            if !held && holders.contains(where: { members[$0].state == .rebuilding }) { rebuildSpoiled = true }
            return Settlement(degraded: degraded, held: held, version: version)
        }
    }

    /// A rebuild pass begins: only changes from now on can spoil it.
    func beginRebuildPass() {
        lock.withLock { rebuildSpoiled = false }
    }

    /// Takes write-mostly `leg`, whose write-behind backlog is full, out of
    /// the writes until it drains (`--on-congestion pull-ahead`): one in
    /// sync, or one being caught up. Never the last leg in sync. Returns
    /// whether it changed.
    func fallBehind(_ leg: Leg) -> Bool {
        lock.withLock {
            // Not a replacement: out, it would replace nothing.
            guard let index = position(of: leg), members[index].state != .degraded, members[index].replaces == nil,
                  members[index].state == .rebuilding || inSyncCount > 1 else { return false }
            degradeLocked(index, cause: .behind)
            return true
        }
    }

    /// Marks leg `index` write-mostly, or not. Returns whether it changed.
    func setWriteMostly(_ index: Int, _ writeMostly: Bool) throws(MirrorError) -> Bool {
        lock.lock()
        defer { lock.unlock() }
        try checkLocked(index)
        guard members[index].writeMostly != writeMostly else { return false }
        members[index].writeMostly = writeMostly
        changed()
        return true
    }

    /// Degrades leg `index` at an operator's request. A leg out for now,
    /// that would come back by itself (pulled ahead, or its connection
    /// lost while the server `retriesLostLegs`), stays out from now on,
    /// until `readd-leg`.
    func failByOperator(_ index: Int, retriesLostLegs: Bool) throws(MirrorError) {
        lock.lock()
        defer { lock.unlock() }
        try checkLocked(index)
        switch members[index].state {
        case .degraded where members[index].cause == .behind || (retriesLostLegs && members[index].lostItsConnection):
            members[index].errno = 0
            members[index].cause = .operator
            changed()
        case .degraded:
            throw .invalidLegChange("leg \(index) is already degraded")
        case .inSync where inSyncCount == 1:
            throw .invalidLegChange("leg \(index) is the last in-sync leg; failing it would lose the data")
        case .inSync, .rebuilding:
            members[index].errno = 0
            degradeLocked(index, cause: .operator)
        }
    }

    /// Lets degraded leg `index`'s device go (its file is closed once no
    /// request holds it any more), so that it can be opened again: a block
    /// device is claimed by one open file at a time. Returns the leg as it
    /// is now; refused for a leg that is not degraded.
    func releaseDevice(of index: Int) throws(MirrorError) -> Member {
        lock.lock()
        defer { lock.unlock() }
        try checkLocked(index)
        guard members[index].state == .degraded else {
            throw .invalidLegChange("leg \(index) is \(members[index].state), not degraded")
        }
        members[index].device = nil
        return members[index]
    }

    /// Where the leg whose UUID is `uuid` is now, if it is a leg.
    func index(of uuid: MirrorUUID) -> Int? { lock.withLock { members.firstIndex { $0.uuid == uuid } } }

    /// Gives degraded leg `index` back a device it was refused with, so that
    /// it stays claimed.
    func keepDevice(_ device: BlockDevice, ofDegraded index: Int) {
        lock.withLock {
            if members[index].state == .degraded && members[index].device == nil { members[index].device = device }
        }
    }

    /// Where a leg brought in goes.
    enum Placement {
        /// In place of leg `index` (a re-added or replaced leg).
        case at(Int)
        /// After the others: a leg added, or (`replacing`) the replacement
        /// of a leg in sync that stays in service until the copy ends.
        case added(replacing: Int?)
    }

    /// Makes `device` a rebuilding leg, placed as `placement` says; returns
    /// its index. Refused in place of the last in-sync leg (its data would
    /// be lost), or beyond the most legs a mirror has.
    func bringIn(_ placement: Placement, device: BlockDevice, uuid: MirrorUUID) throws(MirrorError) -> Int {
        lock.lock()
        defer { lock.unlock() }
        let index: Int
        switch placement {
        case .at(let place):
            try checkLocked(place)
            if members[place].state == .inSync && inSyncCount == 1 {
                throw .invalidLegChange("leg \(place) is the last in-sync leg; put the new leg in place of another")
            }
            index = place
        case .added(let replacing):
            guard members.count < Superblock.maxLegs else {
                throw .invalidLegChange("the mirror has \(members.count) legs, the most it can have")
            }
            if let replacing, let other = members.firstIndex(where: { $0.replaces == replacing }) {
                throw .invalidLegChange("leg \(other) is already being copied to in place of leg \(replacing)")
            }
            members.append(Member(name: device.name, device: device, uuid: uuid, state: .rebuilding, replaces: replacing,
                                  writeMostly: replacing.map { members[$0].writeMostly } ?? false))
            index = members.count - 1
        }
        members[index].device = device
        members[index].name = device.name
        members[index].uuid = uuid
        members[index].state = .rebuilding
        members[index].errno = 0
        members[index].cause = .unknown
        members[index].failedGeneration = 0
        if case .at = placement { members[index].replaces = nil }
        changed()
        return index
    }

    /// Takes leg `index` out of the mirror for good; the legs after it move
    /// down one. Refused when two legs would not be left, for the last leg
    /// in sync, and for a leg a replacement is being copied for.
    func remove(_ index: Int, keepingInSync minInSync: Int = 1) throws(MirrorError) -> Member {
        lock.lock()
        defer { lock.unlock() }
        try checkLocked(index)
        guard members.count > 2 else {
            throw .invalidLegChange("a mirror keeps two legs at least; replace-leg puts another in place of leg \(index)")
        }
        if members[index].state == .inSync && inSyncCount == 1 {
            throw .invalidLegChange("leg \(index) is the last in-sync leg; removing it would lose the data")
        }
        if members[index].state == .inSync && inSyncCount - 1 < minInSync || members.count - 1 < minInSync {
            throw .invalidLegChange("--min-in-sync-legs \(minInSync): without leg \(index), \(inSyncCount - 1) of "
                                    + "\(members.count - 1) legs would be in sync, and writes would stop")
        }
        if let replacement = members.firstIndex(where: { $0.replaces == index }) {
            throw .invalidLegChange("leg \(replacement) is being copied to in place of leg \(index), which goes once "
                                    + "that copy ends; remove-leg \(replacement) stops the replacement")
        }
        let removed = removeLocked(index)
        changed()
        return removed
    }

    /// Refuses an index the legs do not have (they may have moved since the
    /// caller looked); lock held.
    private func checkLocked(_ index: Int) throws(MirrorError) {
        guard members.indices.contains(index) else { throw .noSuchLeg(index, legCount: members.count) }
    }

    /// Removes member `index` and renumbers what the others replace; lock held.
    private func removeLocked(_ index: Int) -> Member {
        let removed = members.remove(at: index)
        for other in members.indices {
            if let replaces = members[other].replaces, replaces > index { members[other].replaces = replaces - 1 }
        }
        return removed
    }

    /// Legs a copy goes to, each on the device it had when the copy began:
    /// a leg re-added or replaced since is not among them.
    /// Known by device, not by index: legs added or removed meanwhile
    /// move the others. Held weakly, not by address: a re-added leg's new
    /// device may be made where its old one was freed, and so have its
    /// `ObjectIdentifier`; a strong reference would keep the old device
    /// open, and claimed, until the pass ended.
    struct Targets: Sendable {
        private struct Target: Sendable {
            weak var device: BlockDevice?
        }

        private let targets: [Target]

        init<Legs: Sequence<Leg>>(_ legs: Legs) {
            targets = legs.map { Target(device: $0.device) }
        }

        func contains(_ leg: Leg) -> Bool { contains(leg.device) }
        func contains(_ device: BlockDevice) -> Bool { targets.contains { $0.device === device } }
        var isEmpty: Bool { targets.isEmpty }
    }

    /// How a rebuild pass ended for the legs it copied to.
    struct Rebuilt {
        /// The legs in sync now, by their index now.
        var inSync: [Int] = []
        /// The legs that replacements took the place of: out of the mirror.
        var retired: [Member] = []
    }

    /// Ends the rebuild of `targets`: those still rebuilding, on the same
    /// device, are in sync, and a replacement among them takes the place of
    /// the leg it replaces, which leaves the mirror. nil, and nothing
    /// changes, when a change the in-sync legs refused reached a rebuilding
    /// leg during the pass.
    func finishRebuilds(_ targets: Targets) -> Rebuilt? {
        lock.withLock {
            guard !rebuildSpoiled else { return nil }
            let copied = members.compactMap { member -> ObjectIdentifier? in
                guard member.state == .rebuilding, let device = member.device, targets.contains(device) else { return nil }
                return ObjectIdentifier(device)
            }
            var rebuilt = Rebuilt()
            for device in copied {
                guard var index = members.firstIndex(where: { $0.device.map(ObjectIdentifier.init) == device }) else { continue }
                members[index].state = .inSync
                if let old = members[index].replaces {
                    // The replacement takes the old leg's place; its own goes.
                    members[index].replaces = nil
                    rebuilt.retired.append(members[old])
                    members[old] = members[index]
                    _ = removeLocked(index)
                    index = old > index ? old - 1 : old
                }
                rebuilt.inSync.append(index)
            }
            changed()
            return rebuilt
        }
    }

    /// What the superblocks record (every leg, and the generation), and the
    /// legs they go to, at one moment: a leg failed in between must not get
    /// the generation that its failure started.
    var recorded: (legs: [LegRecord], generation: UInt64, snapshot: Snapshot) {
        lock.withLock {
            (members.map { LegRecord(uuid: $0.uuid, state: $0.state, cause: $0.cause, errno: $0.errno,
                                     failedGeneration: $0.failedGeneration, name: $0.name, replaces: $0.replaces,
                                     writeMostly: $0.writeMostly) },
             generation, current)
        }
    }
}
