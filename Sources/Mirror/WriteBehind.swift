import DMIO
import Synchronization

/// What a write does when a write-mostly leg has its `--write-behind`
/// writes outstanding already (DRBD's on-congestion).
public enum CongestionPolicy: String, Sendable, CaseIterable {
    /// It waits for that leg, as a write to a leg without write-behind
    /// does (md: a write beyond max_write_behind goes synchronously).
    case block
    /// That leg is written no more ("behind", DRBD's Ahead): its regions
    /// stay dirty, and once its backlog has drained a resync catches it up.
    case pullAhead = "pull-ahead"
}

/// How writes to write-mostly legs go (md's --write-behind).
public struct WriteBehindPolicy: Sendable, Hashable {
    /// Writes outstanding to one write-mostly leg at most, each answered
    /// without it; 0 writes write-mostly legs as the others are.
    public var limit: Int
    public var onCongestion: CongestionPolicy

    /// The bytes of the writes outstanding, all legs together (each holds a
    /// copy of its bytes, shared by its legs): beyond, a write finds every
    /// write-mostly leg full.
    public var maxBytes: Int

    /// 256 writes, md's default, and at most 64 MiB of them; block, DRBD's.
    public static let `default` = WriteBehindPolicy(limit: 256, onCongestion: .block)
    public static let maxLimit = 16383

    public init(limit: Int, onCongestion: CongestionPolicy, maxBytes: Int = 64 << 20) {
        self.limit = limit
        self.onCongestion = onCongestion
        self.maxBytes = maxBytes
    }
}

/// The writes outstanding to write-mostly legs after their answer (md's
/// behind writes): how many per leg, and which bytes. A write that
/// overlaps one waits for it, so that a client that rewrites what it was
/// told is written never has the older bytes land last; so does a read of
/// a write-mostly leg. It starts no I/O.
final class WriteBehind: @unchecked Sendable {
    let policy: WriteBehindPolicy
    /// Writes outstanding, all legs together: while 0 (most of the time
    /// without write-mostly legs) no write looks further.
    private let outstanding = Atomic<Int>(0)
    private let lock = ConditionLock()
    private var perLeg: [ObjectIdentifier: Int] = [:]
    private var ranges: [UInt64: Range<UInt64>] = [:]
    /// The bytes copied for the writes outstanding.
    private var bytes = 0
    private var nextTicket: UInt64 = 0
    private var waiting: [(range: Range<UInt64>, resume: () -> Void)] = []
    /// Legs no write goes behind to (one that is no longer write-mostly,
    /// until what is on its way to it has landed).
    private var closed: Set<ObjectIdentifier> = []
    /// Legs pulled ahead: told (`drained`) once their backlog is empty.
    private var pulledAhead: Set<ObjectIdentifier> = []
    private var pacing = CatchUpPacing()
    private let drained: @Sendable () -> Void

    init(policy: WriteBehindPolicy, drained: @escaping @Sendable () -> Void) {
        self.policy = policy
        self.drained = drained
    }

    /// One write behind, outstanding on some legs.
    struct Ticket {
        fileprivate let number: UInt64
        let legs: [LegTable.Leg]
        fileprivate let bytes: Int
    }

    /// Whether writes to write-mostly legs are on their way.
    var hasOutstanding: Bool { outstanding.load(ordering: .acquiring) > 0 }

    /// Whether I/O to `range` may start now; otherwise `resume` runs once
    /// the writes outstanding that it overlaps have ended.
    func mayStart(_ range: Range<UInt64>, resume: @escaping () -> Void) -> Bool {
        guard hasOutstanding else { return true }
        return lock.withLock {
            guard ranges.values.contains(where: { $0.overlaps(range) }) else { return true }
            waiting.append((range, resume))
            return false
        }
    }

    /// Takes a place for a write to `range` on each of `legs` that has one:
    /// those go behind (the ticket's legs); the others are full. A closed
    /// leg is neither: it is written as the others are.
    func reserve(_ legs: [LegTable.Leg], range: Range<UInt64>, copying count: Int) -> (ticket: Ticket?, full: [LegTable.Leg]) {
        lock.withLock {
            var behind: [LegTable.Leg] = []
            var full: [LegTable.Leg] = []
            let room = bytes == 0 || bytes + count <= policy.maxBytes
            for leg in legs {
                let key = ObjectIdentifier(leg.device)
                if closed.contains(key) { continue }
                if room && perLeg[key, default: 0] < policy.limit {
                    perLeg[key, default: 0] += 1
                    behind.append(leg)
                } else {
                    full.append(leg)
                }
            }
            guard !behind.isEmpty else { return (nil, full) }
            nextTicket += 1
            ranges[nextTicket] = range
            bytes += count
            outstanding.add(1, ordering: .releasing)
            return (Ticket(number: nextTicket, legs: behind, bytes: count), full)
        }
    }

    /// The write of `ticket` ended on its legs: writes and reads that
    /// waited for it go on (outside the lock; they look again).
    func ended(_ ticket: Ticket) {
        let (resumed, emptied) = lock.withLock {
            ranges[ticket.number] = nil
            bytes -= ticket.bytes
            outstanding.subtract(1, ordering: .releasing)
            var emptied = false
            for leg in ticket.legs {
                let key = ObjectIdentifier(leg.device)
                perLeg[key, default: 1] -= 1
                if perLeg[key] == 0 {
                    perLeg[key] = nil
                    emptied = pulledAhead.remove(key) != nil || emptied
                }
            }
            // For those that wait for every write, or a leg's, to land.
            lock.broadcast()
            var resumed: [() -> Void] = []
            waiting.removeAll { waiter in
                let free = !ranges.values.contains { $0.overlaps(waiter.range) }
                if free { resumed.append(waiter.resume) }
                return free
            }
            return (resumed, emptied)
        }
        resumed.forEach { $0() }
        if emptied { drained() }
    }

    /// Writes outstanding, all legs together.
    var outstandingCount: Int { outstanding.load(ordering: .acquiring) }

    /// Waits until no write is outstanding.
    func waitUntilDrained() {
        lock.withLock { while !ranges.isEmpty { lock.wait() } }
    }

    /// Waits until no write is outstanding to `device`.
    func waitUntilDrained(_ device: BlockDevice) {
        lock.withLock { while perLeg[ObjectIdentifier(device)] != nil { lock.wait() } }
    }

    /// No write goes behind to `device` from now on.
    func close(_ device: BlockDevice) { _ = lock.withLock { closed.insert(ObjectIdentifier(device)) } }

    /// Writes may go behind to `device` again.
    func open(_ device: BlockDevice) { _ = lock.withLock { closed.remove(ObjectIdentifier(device)) } }

    /// Writes outstanding to `device`.
    func backlog(of device: BlockDevice) -> Int { lock.withLock { perLeg[ObjectIdentifier(device)] ?? 0 } }

    /// `device` was pulled ahead: `drained` is told when its backlog is
    /// empty (at once when it is already).
    func pulledAhead(_ device: BlockDevice) {
        let empty = lock.withLock {
            let key = ObjectIdentifier(device)
            pacing.pulledAhead(key, at: .now)
            guard perLeg[key] != nil else { return true }
            pulledAhead.insert(key)
            return false
        }
        if empty { drained() }
    }

    /// Whether `device`, pulled ahead, may be caught up now: its backlog
    /// has drained and its pacing allows it.
    func mayCatchUp(_ device: BlockDevice) -> Bool {
        lock.withLock { perLeg[ObjectIdentifier(device)] == nil && pacing.mayCatchUp(ObjectIdentifier(device), at: .now) }
    }

    /// `device` is being caught up.
    func catchingUp(_ device: BlockDevice) {
        lock.withLock { pacing.catchingUp(ObjectIdentifier(device)) }
    }

    /// `device` is in sync again (a catch-up, or any rebuild, finished).
    func inSync(_ device: BlockDevice) {
        lock.withLock { pacing.inSync(ObjectIdentifier(device), at: .now) }
    }

    /// The soonest a leg pulled ahead may be caught up, if one waits.
    var nextCatchUp: ContinuousClock.Instant? { lock.withLock { pacing.nextCatchUp(after: .now) } }
}

/// When a leg pulled ahead is caught up: at once, unless it was pulled
/// ahead again while being caught up, or within 10 s of being back in
/// sync (a load it cannot follow). Then it waits, a second the first time
/// and twice as long each time after, up to a minute: a catch-up takes the
/// mirror's writes back to the leg's pace until it is pulled ahead again,
/// and under such a load it would start again and again. A leg that stayed
/// in sync for a while starts the count over.
struct CatchUpPacing {
    static let firstWait = Duration.seconds(1)
    static let longestWait = Duration.seconds(60)
    /// A leg pulled ahead again sooner after it was back in sync waits longer.
    static let held = Duration.seconds(10)

    private struct Leg {
        var catchingUp = false
        var inSyncSince: ContinuousClock.Instant?
        var wait = Duration.zero
        var notBefore: ContinuousClock.Instant
    }

    private var legs: [ObjectIdentifier: Leg] = [:]

    mutating func pulledAhead(_ leg: ObjectIdentifier, at now: ContinuousClock.Instant) {
        var state = legs[leg] ?? Leg(notBefore: now)
        let didNotHold = state.catchingUp || state.inSyncSince.map { now - $0 < Self.held } ?? false
        state.wait = !didNotHold ? .zero : state.wait == .zero ? Self.firstWait : min(state.wait * 2, Self.longestWait)
        state.catchingUp = false
        state.inSyncSince = nil
        state.notBefore = now + state.wait
        legs[leg] = state
    }

    func mayCatchUp(_ leg: ObjectIdentifier, at now: ContinuousClock.Instant) -> Bool {
        legs[leg].map { now >= $0.notBefore } ?? true
    }

    /// The soonest after `now` that a leg pulled ahead, and waiting, may be caught up.
    func nextCatchUp(after now: ContinuousClock.Instant) -> ContinuousClock.Instant? {
        legs.values.filter { !$0.catchingUp && $0.inSyncSince == nil && $0.notBefore > now }.map(\.notBefore).min()
    }

    mutating func catchingUp(_ leg: ObjectIdentifier) {
        legs[leg]?.catchingUp = true
    }

    mutating func inSync(_ leg: ObjectIdentifier, at now: ContinuousClock.Instant) {
        guard legs[leg]?.catchingUp == true else { return }
        legs[leg]?.catchingUp = false
        legs[leg]?.inSyncSince = now
    }
}
