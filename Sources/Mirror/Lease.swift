import DMIO
import Glibc
import Synchronization

extension MirrorUUID {
    /// 32 hex digits, dashes allowed (a UUID, /etc/machine-id, boot_id).
    public init?(hex text: String) {
        let digits = text.filter { $0 != "-" }.lowercased()
        guard digits.count == 32, let high = UInt64(digits.prefix(16), radix: 16),
              let low = UInt64(digits.suffix(16), radix: 16) else { return nil }
        self.init(high: high, low: low)
    }
}

extension MirrorOwner {
    /// This server: `hostID` (else /etc/machine-id), this boot, this pid,
    /// this run.
    public static func local(hostID: String?, lease: Duration) throws(MirrorError) -> MirrorOwner {
        guard let host = MirrorUUID(hex: hostID ?? readText("/etc/machine-id")?.trimmed ?? "") else {
            throw .invalidOwnership(hostID.map { "--host-id \($0) is not 32 hex digits (a UUID, as /etc/machine-id)" }
                                    ?? "this machine has no /etc/machine-id: give it a --host-id (a UUID)")
        }
        let boot = readText("/proc/sys/kernel/random/boot_id").flatMap { MirrorUUID(hex: $0.trimmed) } ?? .random()
        let milliseconds = UInt32(clamping: lease.components.seconds * 1000 + lease.components.attoseconds / 1_000_000_000_000_000)
        return MirrorOwner(host: host, boot: boot, pid: UInt32(bitPattern: getpid()), leaseMilliseconds: milliseconds,
                           instance: processInstance)
    }

    /// This process's instance: one for every mirror it serves.
    private static let processInstance = UInt64.random(in: 1...UInt64.max)
}

/// This server's hold on legs that another machine could open: it writes
/// nothing once its lease has run out without a renewal (a freeze, a
/// stall), until a renewal, read before and after it is written, found
/// itself still their owner; if another server took them over, it is
/// fenced for good: every write fails, and no metadata is written. Writes
/// checked here cost a clock read and an atomic load.
final class Lease: @unchecked Sendable {
    let owner: MirrorOwner
    /// Renewals come this often: five to a lease.
    var renewInterval: Duration { owner.lease / 5 }
    private let origin = ContinuousClock.now
    /// Nanoseconds after `origin` until which writes may go on.
    private let validUntil = Atomic<Int64>(0)
    private let fenced = Atomic<Bool>(false)
    private let lock = ConditionLock()
    /// Writes that came after the lease ran out, waiting for the re-read.
    private var waiting: [@Sendable (Bool) -> Void] = []

    init(owner: MirrorOwner) {
        self.owner = owner
    }

    private func nanoseconds(_ instant: ContinuousClock.Instant) -> Int64 {
        let (seconds, attoseconds) = (instant - origin).components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }

    /// Whether a write may go to the legs now.
    var isValid: Bool { nanoseconds(.now) < validUntil.load(ordering: .acquiring) && !isFenced }

    var isFenced: Bool { fenced.load(ordering: .acquiring) }

    /// A renewal that began at `started` is on the legs: the lease runs
    /// from then; writes that waited go on, unless it ran out already (the
    /// renewal took a lease: the next one, quicker, lets them go).
    func renewed(startedAt started: ContinuousClock.Instant) {
        validUntil.store(nanoseconds(started + owner.lease), ordering: .releasing)
        guard isValid else { return }
        for resume in takeWaiting() { resume(true) }
    }

    /// Another server owns the legs now: nothing more is written, and the
    /// writes that waited fail.
    func fence() {
        fenced.store(true, ordering: .releasing)
        for resume in takeWaiting() { resume(false) }
    }

    /// The writes waiting, taken out, to be answered outside the lock.
    private func takeWaiting() -> [@Sendable (Bool) -> Void] {
        lock.withLock {
            defer { waiting = [] }
            return waiting
        }
    }

    /// Calls `resume` once the lease is renewed (true) or lost (false);
    /// at once when it is valid, or fenced, already.
    func whenValid(_ resume: @escaping @Sendable (Bool) -> Void) {
        let now: Bool? = lock.withLock {
            if isFenced { return false }
            if isValid { return true }
            waiting.append(resume)
            return nil
        }
        if let now { resume(now) }
    }
}

/// How a server holds a mirror whose legs another machine could open
/// (`serve --lease`, `--host-id`, `--takeover`).
public struct Ownership: Sendable {
    /// This server; nil when its machine has no identity, and then any
    /// owner recorded on the legs counts as another machine's.
    public var me: MirrorOwner?
    /// Whether this server holds a lease on the legs while it serves.
    public var holdsLease: Bool
    /// Whether it may take legs over from an owner whose lease ran out.
    public var takeover: Bool
    /// Called once if the legs turn out to be another server's: this one
    /// then writes nothing more, and should stop serving.
    public var lost: @Sendable (String) -> Void

    public init(me: MirrorOwner?, holdsLease: Bool, takeover: Bool, lost: @escaping @Sendable (String) -> Void = { _ in }) {
        self.me = me
        self.holdsLease = holdsLease
        self.takeover = takeover
        self.lost = lost
    }

    public static let none = Ownership(me: nil, holdsLease: false, takeover: false)
}

/// A server on another machine whose lease on the legs ran out, and that
/// this one takes the legs over from (`--takeover`): its newest event
/// when watched.
struct TakenOver: Sendable {
    let owner: MirrorOwner
    let event: UInt64
}
