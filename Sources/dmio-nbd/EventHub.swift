import BlockTargets
import CDMIOSupport
import DMIO
import Glibc
import Monitoring

/// The events of one server, to everyone listening: `dmio-nbd events`
/// watchers and the `--on-event` program. Each listener has a bounded queue
/// and a thread of its own; `publish` only appends to the queues, so a
/// slow or stuck listener never holds the mirror.
final class EventHub: EventSink, @unchecked Sendable {
    /// Watchers at once: each is a thread and a socket.
    static let maxWatchers = 64

    enum Refusal: Error, CustomStringConvertible {
        case stopping
        case tooManyWatchers
        case noThread(errno: Int32)

        var description: String {
            switch self {
            case .stopping: "the server is stopping"
            case .tooManyWatchers: "\(EventHub.maxWatchers) watchers listen already"
            case .noThread(let errno): "no thread for it: \(errnoDescription(errno))"
            }
        }
    }

    private let lock = ConditionLock()
    private var queues: [ObjectIdentifier: EventQueue] = [:]
    private var closed = false
    /// Past the stop's wait: listeners still busy give up what they do.
    private var abandoned = false
    private var watchers = 0
    /// Listener threads not yet ended: a stop waits for them.
    private var running = 0

    func publish(_ event: Event) {
        lock.withLock {
            for (id, queue) in queues where !queue.offer(event) { queues[id] = nil }
        }
    }

    /// Starts a listener: `body` runs on a thread of its own with a queue
    /// that gets every event from now on that `accepts`; the listener ends
    /// when `body` returns. A watcher counts against `maxWatchers`.
    func listen(named name: String, watcher: Bool, overflow: EventQueue.Overflow,
                accepts: @escaping @Sendable (Event) -> Bool = { _ in true },
                _ body: @escaping (EventQueue) -> Void) throws(Refusal) {
        let queue = EventQueue(capacity: EventQueue.defaultCapacity, overflow: overflow, accepts: accepts)
        let refusal: Refusal? = lock.withLock {
            if closed { return .stopping }
            if watcher && watchers >= Self.maxWatchers { return .tooManyWatchers }
            queues[ObjectIdentifier(queue)] = queue
            running += 1
            if watcher { watchers += 1 }
            return nil
        }
        if let refusal { throw refusal }
        let failure = startDetachedThread(named: name) { [self] in
            body(queue)
            ended(queue, watcher: watcher)
        }
        if let failure {
            ended(queue, watcher: watcher)
            throw .noThread(errno: failure)
        }
    }

    private func ended(_ queue: EventQueue, watcher: Bool) {
        lock.withLock {
            queues[ObjectIdentifier(queue)] = nil
            running -= 1
            if watcher { watchers -= 1 }
            lock.broadcast()
        }
    }

    /// Whether the stop waited long enough: a listener still busy gives up
    /// (the event program running is killed).
    var isAbandoned: Bool { lock.withLock { abandoned } }

    /// Ends every listener (the server stops): each gets what is queued,
    /// then the end. Waits `within` at most for them to finish.
    func close(within: Duration) {
        let all = lock.withLock {
            closed = true
            defer { queues = [:] }
            return Array(queues.values)
        }
        for queue in all { queue.close() }
        let deadline = ContinuousClock.now + within
        lock.withLock {
            while running > 0 && ContinuousClock.now < deadline { lock.wait(for: .milliseconds(100)) }
            abandoned = true
        }
    }
}

/// A `dmio-nbd events` client on the control socket: its events as JSON
/// lines, on a thread of its own, until it goes away, the server stops, or
/// it reads too slowly (its queue fills: a last line says it was dropped;
/// or a write waits 10 s: it is cut).
enum EventWatch {
    static let sendTimeout = timeval(tv_sec: 10, tv_usec: 0)
    /// How often a watcher with nothing to send looks whether its client left.
    static let hangUpCheck = Duration.seconds(1)

    /// Serves `connection`: `now`'s events first (the state, ended by an
    /// `exists -` line), then each event as it happens. The state is read
    /// once the watcher listens: a change meanwhile may show twice (in the
    /// state and as a change), never not at all. A watcher refused gets a
    /// `refused` line saying why.
    static func start(_ connection: Int32, hub: EventHub, now: (() -> [Event])?) {
        var timeout = sendTimeout
        setsockopt(connection, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        do {
            try hub.listen(named: "dmio-events", watcher: true, overflow: .drop) { queue in
                defer { close(connection) }
                for event in now.map({ $0() + [Event("exists", "-", [])] }) ?? [] {
                    guard send(event, to: connection) else { return }
                }
                while true {
                    switch queue.next(waitingAtMost: hangUpCheck) {
                    case .event(let event):
                        guard send(event, to: connection) else { return }
                    case .overflowed:
                        _ = send(Event("dropped", "-", [Event.Field("reason", "events-not-read-fast-enough")]), to: connection)
                        return
                    case .closed:
                        return
                    case .idle:
                        if hungUp(connection) { return }
                    }
                }
            }
        } catch {
            _ = send(Event("refused", "-", [Event.Field("reason", "\(error)")]), to: connection)
            close(connection)
        }
    }

    private static func send(_ event: Event, to connection: Int32) -> Bool {
        sendAll(connection, encodeJSON(event) + "\n")
    }

    /// Whether the client closed its end (it sends nothing after its request).
    private static func hungUp(_ connection: Int32) -> Bool { dmio_peer_hung_up(connection) == 1 }
}

/// The server's own events (connections), with the mirror they are of.
struct ServerEventSink: EventSink {
    let hub: EventHub
    let mirror: String

    func publish(_ event: Event) {
        hub.publish(Event(event.verb, event.object, [Event.Field("mirror", mirror)] + event.fields))
    }
}
