import BlockTargets
import DMIO

/// One listener's events, in order, at most `capacity` of them waiting.
public final class EventQueue: @unchecked Sendable {
    /// More than any burst a mirror makes (a leg change is a few events,
    /// a resync a hundred), and small: 64 watchers that never read hold a
    /// few MiB at most.
    public static let defaultCapacity = 1024

    /// What a queue that fills does.
    public enum Overflow {
        /// The listener is dropped (a watcher, told so when it next reads).
        case drop
        /// The waiting events are forgotten and the listener told so, and
        /// it goes on with the events after (the hook, which then reads the
        /// mirror as it is).
        case forget
    }

    public enum Next: Equatable {
        case event(Event)
        /// The queue filled: events were lost.
        case overflowed
        case closed
        /// Nothing came within the wait.
        case idle
    }

    private let capacity: Int
    private let overflow: Overflow
    private let accepts: @Sendable (Event) -> Bool
    private let lock = ConditionLock()
    private var events: [Event] = []
    private var head = 0
    private var overflowed = false
    private var closed = false

    public init(capacity: Int, overflow: Overflow, accepts: @escaping @Sendable (Event) -> Bool) {
        self.capacity = capacity
        self.overflow = overflow
        self.accepts = accepts
    }

    /// Queues `event` if the listener wants it; false when the listener is
    /// to be dropped (its queue filled, and it drops).
    public func offer(_ event: Event) -> Bool {
        guard accepts(event) else { return true }
        return lock.withLock {
            if closed || (overflowed && overflow == .drop) { return false }
            if events.count - head >= capacity {
                overflowed = true
                guard overflow == .forget else { return false }
                events.removeAll()
                head = 0
            }
            events.append(event)
            lock.signal()
            return true
        }
    }

    public func close() {
        lock.withLock {
            closed = true
            lock.signal()
        }
    }

    /// The next event, waiting for one `atMost` that long (nil: for ever).
    public func next(waitingAtMost atMost: Duration? = nil) -> Next {
        lock.withLock {
            let deadline = atMost.map { ContinuousClock.now + $0 }
            while true {
                // One that forgets hears it before the events that came
                // after; one dropped, after what its queue held.
                if overflowed && overflow == .forget {
                    overflowed = false
                    return .overflowed
                }
                if head < events.count {
                    let event = events[head]
                    head += 1
                    if head > 64 && head * 2 > events.count {
                        events.removeFirst(head)
                        head = 0
                    }
                    return .event(event)
                }
                if overflowed { return .overflowed }
                if closed { return .closed }
                if let deadline {
                    let left = deadline - ContinuousClock.now
                    if left <= .zero { return .idle }
                    lock.wait(for: left)
                } else {
                    lock.wait()
                }
            }
        }
    }
}
