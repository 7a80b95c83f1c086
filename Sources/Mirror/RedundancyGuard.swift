import BlockTargets
import DMIO
import Glibc

/// How many legs must be in sync for a write to go to the legs, and what a
/// write does when fewer are (DRBD's quorum with on-no-quorum, in legs).
public struct RedundancyPolicy: Sendable, Hashable {
    public enum OnLoss: String, CaseIterable, Sendable {
        /// The write fails with EIO at once.
        case fail
        /// The write waits until enough legs are in sync again (a re-added
        /// or replaced leg's copy has ended), or the server stops.
        case hold
    }

    public var minInSync: Int
    public var onLoss: OnLoss

    /// As md and dm-raid1: any one leg in sync takes writes.
    public static let `default` = RedundancyPolicy(minInSync: 1, onLoss: .fail)

    public init(minInSync: Int, onLoss: OnLoss) {
        self.minInSync = minInSync
        self.onLoss = onLoss
    }
}

/// The gate a write passes before it goes to the legs: with too few legs
/// in sync it is refused or held, as the policy says. Held writes are let
/// go by `release` (the mirror's background thread calls it on each tick,
/// and after each resync), or failed by `close` at a stop.
final class RedundancyGuard: @unchecked Sendable {
    let policy: RedundancyPolicy
    private let lock = ConditionLock()
    /// Each held write's way on: true, to the legs; false, it fails.
    private var held: [(Bool) -> Void] = []
    /// Set at a stop: no write is held any more.
    private var closed = false

    enum Admission {
        case go
        case refused(TargetResult)
        case held
    }

    init(policy: RedundancyPolicy) {
        self.policy = policy
    }

    /// Whether a write may go to the legs, with `inSync` legs in sync. When
    /// it is held, `resume` runs later, once (on the thread that lets it go).
    func admit(inSync: Int, resume: @escaping (Bool) -> Void) -> Admission {
        guard inSync < policy.minInSync else { return .go }
        switch policy.onLoss {
        case .fail:
            return .refused(lostRedundancy(inSync))
        case .hold:
            let isHeld = lock.withLock {
                if !closed { held.append(resume) }
                return !closed
            }
            return isHeld ? .held : .refused(lostRedundancy(inSync))
        }
    }

    /// Lets the held writes go when `inSync` legs are enough.
    func release(inSync: Int) {
        guard inSync >= policy.minInSync else { return }
        for resume in take() { resume(true) }
    }

    /// Fails the held writes, and holds no more: the server stops.
    func close() {
        lock.withLock { closed = true }
        for resume in take() { resume(false) }
    }

    /// What a mirror starting with `inSync` legs in sync says, when they
    /// are too few.
    func shortfall(inSync: Int) -> String? {
        guard inSync < policy.minInSync else { return nil }
        return shortOfLegs(inSync, writes: policy.onLoss == .fail ? "are refused" : "wait")
    }

    private func lostRedundancy(_ inSync: Int) -> TargetResult {
        TargetResult(errno: EIO, message: shortOfLegs(inSync, writes: "are refused"))
    }

    private func shortOfLegs(_ inSync: Int, writes: String) -> String {
        "only \(inSync) leg\(inSync == 1 ? "" : "s") in sync, fewer than --min-in-sync-legs \(policy.minInSync): "
            + "writes \(writes) until a leg is back in sync"
    }

    private func take() -> [(Bool) -> Void] {
        lock.withLock {
            let taken = held
            held = []
            return taken
        }
    }
}
