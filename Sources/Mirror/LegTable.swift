import DMIO
import Glibc

/// The legs and their health: which are read, which are written, and why a
/// leg left the mirror. Requests take a snapshot (two arrays, replaced on
/// every change) so that the I/O path holds the lock only to copy a
/// reference.
final class LegTable: @unchecked Sendable {
    struct Member {
        var device: BlockDevice
        var uuid: MirrorUUID
        var state: LegState
        /// What failed the leg, or the last error it returned.
        var errno: Int32 = 0
        var readErrors = 0
        var writeErrors = 0
    }

    /// A leg as a request sees it.
    struct Leg {
        let index: Int
        let device: BlockDevice
    }

    /// The legs a request may use, at one moment.
    final class Snapshot: Sendable {
        /// Counts the table's changes: a request that saw this snapshot may
        /// answer once the superblocks record this version.
        let version: UInt64
        /// In-sync legs, in order: reads go to the first.
        let readable: [Leg]
        /// In-sync and rebuilding legs: writes go to all of them.
        let writable: [Leg]

        init(_ members: [Member], version: UInt64) {
            self.version = version
            readable = members.indices.filter { members[$0].state == .inSync }
                .map { Leg(index: $0, device: members[$0].device) }
            writable = members.indices.filter { members[$0].state != .degraded }
                .map { Leg(index: $0, device: members[$0].device) }
        }
    }

    private let lock = ConditionLock()
    private var members: [Member]
    private var current: Snapshot
    private var version: UInt64 = 0

    init(_ members: [Member]) {
        self.members = members
        current = Snapshot(members, version: 0)
    }

    /// Publishes the members as they are now; call with the lock held.
    private func changed() {
        version += 1
        current = Snapshot(members, version: version)
    }

    var snapshot: Snapshot { lock.withLock { current } }
    var count: Int { lock.withLock { members.count } }

    func member(_ index: Int) -> Member { lock.withLock { members[index] } }
    var all: [Member] { lock.withLock { members } }

    var allInSync: Bool { lock.withLock { members.allSatisfy { $0.state == .inSync } } }

    /// Records a failed request on leg `index`. The leg becomes degraded
    /// unless it is the last in-sync leg: like md, a mirror never fails its
    /// last copy of the data; that leg's errors go to the client instead.
    /// Returns whether the leg's state changed.
    @discardableResult
    func fail(_ index: Int, errno: Int32, reading: Bool) -> Bool {
        lock.withLock {
            if reading { members[index].readErrors += 1 } else { members[index].writeErrors += 1 }
            members[index].errno = errno
            switch members[index].state {
            case .degraded:
                return false
            case .inSync where members.filter({ $0.state == .inSync }).count == 1:
                return false
            case .inSync, .rebuilding:
                members[index].state = .degraded
                changed()
                return true
            }
        }
    }

    /// Moves leg `index` to `state`, optionally on a new device.
    func set(_ index: Int, state: LegState, device: BlockDevice? = nil, uuid: MirrorUUID? = nil) {
        lock.withLock {
            members[index].state = state
            if state != .degraded { members[index].errno = 0 }
            if let device { members[index].device = device }
            if let uuid { members[index].uuid = uuid }
            changed()
        }
    }

    /// Legs a copy goes to, each on the device it had when the copy began:
    /// a leg re-added or replaced since is not among them.
    struct Targets {
        private let devices: [Int: ObjectIdentifier]

        init<Legs: Sequence<Leg>>(_ legs: Legs) {
            devices = Dictionary(uniqueKeysWithValues: legs.map { ($0.index, ObjectIdentifier($0.device)) })
        }

        func contains(_ leg: Leg) -> Bool { devices[leg.index] == ObjectIdentifier(leg.device) }
        var indices: [Int] { devices.keys.sorted() }
    }

    /// Ends the rebuild of `targets`: those still rebuilding, on the same
    /// device, are in sync.
    func finishRebuilds(_ targets: Targets) -> [Int] {
        lock.withLock {
            let rebuilt = targets.indices.filter { index in
                members[index].state == .rebuilding
                    && targets.contains(Leg(index: index, device: members[index].device))
            }
            for index in rebuilt { members[index].state = .inSync }
            changed()
            return rebuilt
        }
    }

    var records: [LegRecord] {
        lock.withLock { members.map { LegRecord(uuid: $0.uuid, state: $0.state, errno: $0.errno) } }
    }
}
