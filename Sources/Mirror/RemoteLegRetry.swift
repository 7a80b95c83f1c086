import DMIO
import Glibc

/// When to try again to bring back each remote leg that went away (its
/// server stopped, or stopped answering): first `first` after it went, then
/// twice as long after each failed try, up to `longest` (DRBD's connect-int,
/// with a backoff). A leg whose server answers with something that is not
/// that leg any more is refused for good: it comes back only by an
/// operator's hand. Legs are known by UUID, which stays when legs move.
/// A state machine, without a clock or a thread of its own.
struct RemoteLegRetry {
    /// What to do with a leg now.
    enum Action: Equatable {
        case wait
        case tryNow
    }

    let first: Duration
    let longest: Duration
    private var legs: [MirrorUUID: (due: ContinuousClock.Instant, interval: Duration)] = [:]
    private var refused: Set<MirrorUUID> = []

    init(first: Duration, longest: Duration = .seconds(60)) {
        self.first = first
        self.longest = max(first, longest)
    }

    /// The remote legs out for a lost connection are `waiting`; every other
    /// leg is forgotten (it came back, or left the mirror).
    mutating func track(_ waiting: some Collection<MirrorUUID>, now: ContinuousClock.Instant) {
        let current = Set(waiting)
        legs = legs.filter { current.contains($0.key) }
        refused.formIntersection(current)
        for uuid in current where legs[uuid] == nil && !refused.contains(uuid) {
            legs[uuid] = (now + first, first)
        }
    }

    func action(for uuid: MirrorUUID, now: ContinuousClock.Instant) -> Action {
        guard let leg = legs[uuid] else { return .wait }
        return now >= leg.due ? .tryNow : .wait
    }

    /// The try failed (no answer yet): the next waits twice as long.
    mutating func failed(_ uuid: MirrorUUID, now: ContinuousClock.Instant) {
        guard let leg = legs[uuid] else { return }
        let interval = min(longest, leg.interval * 2)
        legs[uuid] = (now + interval, interval)
    }

    /// The server answered with something that must not come back.
    mutating func refuse(_ uuid: MirrorUUID) {
        legs[uuid] = nil
        refused.insert(uuid)
    }

    /// How long until the next try is due, if any is.
    func nextDue(now: ContinuousClock.Instant) -> Duration? {
        legs.values.map { max(.zero, now.duration(to: $0.due)) }.min()
    }
}

extension BlockDevice {
    /// Whether a request or an open that failed with `errno` failed because
    /// a remote leg's connection is gone (its server stopped, restarted, or
    /// stopped answering), not because of what the server answered.
    public static func isConnectionLoss(_ errno: Int32) -> Bool {
        [ENOTCONN, ECONNRESET, ECONNREFUSED, ECONNABORTED, EPIPE, ESHUTDOWN, ETIMEDOUT, EHOSTUNREACH,
         ENETUNREACH, ENETDOWN, EHOSTDOWN, ENOENT].contains(errno)
    }
}

extension LegTable.Member {
    /// A remote leg out because its connection was lost: one to try again.
    var lostItsConnection: Bool {
        state == .degraded && DeviceSpec.isURI(name) && [.read, .write, .open].contains(cause)
            && BlockDevice.isConnectionLoss(errno)
    }
}
