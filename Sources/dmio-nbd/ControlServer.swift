import CDMIOSupport
import ControlProtocol
import DMIO
import Glibc
import Logging
import Mirror

/// The mirror's control socket (mode 0600): each connection sends one
/// `ControlRequest` and gets one `ControlAnswer`. Requests are served one at
/// a time, on a thread of their own: they are rare, and the leg changes they
/// make wait for metadata writes.
final class ControlServer: @unchecked Sendable {
    private let listener: Listener
    private let mirror: Mirror
    private let served: [String]
    private let events: EventHub
    private let logger: Logger
    private var thread: pthread_t?

    /// Serves `mirror`, which clients reach on `served`, on `listener`
    /// (bound before the mirror was opened).
    init(listener: Listener, mirror: Mirror, served: [String], events: EventHub, logger: Logger) {
        self.listener = listener
        self.mirror = mirror
        self.served = served
        self.events = events
        self.logger = logger
        thread = startThread(named: "dmio-control") { [self] in serve() }
        logger.info("control socket \(listener.path ?? "")")
    }

    func stop() {
        Glibc.shutdown(listener.socket, Int32(SHUT_RDWR))
        if let thread { pthread_join(thread, nil) }
        listener.close()
    }

    private func serve() {
        while true {
            // Not inherited by an event program the server starts.
            let connection = dmio_accept_cloexec(listener.socket)
            if connection < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                return
            }
            // A client that sends no line must not hold the socket (or a stop) for long.
            var timeout = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(connection, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            let line = readLine(connection) ?? ""
            // A watcher of events keeps its connection, on a thread of its own.
            if let request = ControlRequest.parse(line), request.command == .events {
                EventWatch.start(connection, hub: events, now: request.now == true ? { [mirror] in mirror.status.existsEvents } : nil)
                continue
            }
            sendAll(connection, encodeJSON(answer(line)) + "\n")
            close(connection)
        }
    }

    private func answer(_ line: String) -> ControlAnswer {
        guard let request = ControlRequest.parse(line) else {
            logger.warning("control: unreadable request \(line.prefix(200))")
            return answer(error: "unreadable request (is the client another version of dmio-nbd?)")
        }
        do {
            switch request.command {
            case .status:
                return answer(error: nil)
            case .events:
                return answer(error: "events are answered as a stream, not an answer")
            case .failLeg:
                try mirror.failLeg(request.leg!)
            case .readdLeg:
                try mirror.readdLeg(request.leg!)
            case .replaceLeg:
                try mirror.replaceLeg(request.leg!, with: request.device!, force: request.force ?? false)
            case .addLeg:
                try mirror.addLeg(request.device!, force: request.force ?? false)
            case .removeLeg:
                try mirror.removeLeg(request.leg!)
            case .setLeg:
                try mirror.setWriteMostly(request.leg!, request.writeMostly!)
            case .check:
                try mirror.startScrub(.check)
            case .repair:
                try mirror.startScrub(.repair)
            case .cancelScrub:
                try mirror.cancelScrub()
            }
            logger.info("control: \(request.description) done")
            return answer(error: nil)
        } catch {
            logger.warning("control: \(request.description): \(error)")
            return answer(error: "\(error)")
        }
    }

    private func answer(error: String?) -> ControlAnswer {
        ControlAnswer(ok: error == nil, error: error, report: MirrorReport(mirror: mirror.status, served: served))
    }
}
