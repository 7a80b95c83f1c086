import BlockTargets
import CDMIOSupport
import DMIO
import Dispatch
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// Where a server listens.
public enum ListenAddress: Sendable, Hashable, CustomStringConvertible {
    case unix(path: String)
    case tcp(host: String, port: Int)

    public var description: String {
        switch self {
        case .unix(let path): "unix:\(path)"
        case .tcp(let host, let port): "\(host):\(port)"
        }
    }
}

/// An NBD server: serves its exports to any number of connections, each on
/// one event loop, all sharing the exports' targets.
public final class NBDServer: @unchecked Sendable {
    private let exports: [Export]
    private let tls: ServerTLS?
    private let group: MultiThreadedEventLoopGroup
    private let logger: Logger
    /// Where connections opened and closed are told.
    private let events: (any EventSink)?
    private let listeners = NIOLockedValueBox<[Channel]>([])
    /// The event loops' own DMIO clients, made with the first listener.
    private let loopIO = NIOLockedValueBox<[ObjectIdentifier: EventLoopIO]?>(nil)
    private let connections = NIOLockedValueBox<[ObjectIdentifier: Channel]>([:])

    private let ringPerLoop: Bool
    private let loopCount: Int
    /// Requests in flight and bytes buffered, per event loop.
    private let loads: [ObjectIdentifier: LoopLoad]
    /// Each loop's look, every second, whether a burst ended.
    private let memoryWatch: [RepeatedTask]

    /// The bytes of requests and replies all connections together buffer
    /// before they stop, unless told otherwise.
    public static let defaultBufferLimit = 256 << 20
    /// How often each loop looks whether a burst ended.
    static let memoryWatchInterval = TimeAmount.seconds(1)

    /// `threads` event loops share the connections (one per core by default).
    /// With `ringPerLoop`, each loop drives its own DMIO io_uring (see
    /// `DMIOClient.threadDriven`); where io_uring is refused, or without it,
    /// targets use their own client. The connections together buffer about
    /// `bufferLimit` bytes of requests and replies at most (each loop a
    /// share, which one request may pass by its length). With `tls`, clients
    /// may (or must, as its policy says) run TLS.
    public init(exports: [Export], tls: ServerTLS? = nil, threads: Int = System.coreCount, ringPerLoop: Bool = true,
                bufferLimit: Int = NBDServer.defaultBufferLimit, events: (any EventSink)? = nil, logger: Logger) {
        precondition(!exports.isEmpty, "a server needs an export")
        self.exports = exports
        self.tls = tls
        self.events = events
        self.logger = logger
        self.ringPerLoop = ringPerLoop
        loopCount = threads
        group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        let share = max(1, bufferLimit / threads)
        loads = Dictionary(uniqueKeysWithValues: group.makeIterator().map { (ObjectIdentifier($0), LoopLoad(bufferLimit: share)) })
        memoryWatch = Self.watchMemory(of: group, loads)
    }

    /// Starts listening; returns the address bound (with the real port for
    /// a TCP port of 0).
    @discardableResult
    public func listen(on address: ListenAddress) async throws -> ListenAddress {
        let bootstrap = try await bootstrap()
        let channel: Channel
        switch address {
        case .unix(let path):
            channel = try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: false).get()
        case .tcp(let host, let port):
            channel = try await bootstrap.bind(host: host, port: port).get()
        }
        return accepted(channel, address)
    }

    /// Serves on a socket that is already bound and listening (bound before
    /// anything else started, or handed over by systemd), which the server
    /// then owns; `address` is what it is bound to.
    public func serve(listening socket: Int32, address: ListenAddress) async throws {
        let channel = try await bootstrap().withBoundSocket(socket).get()
        _ = accepted(channel, address)
    }

    private func bootstrap() async throws -> ServerBootstrap {
        if ringPerLoop && loopIO.withLockedValue({ $0 == nil }) {
            do {
                let attached = try await EventLoopIO.attach(to: group)
                loopIO.withLockedValue { $0 = attached }
            } catch {
                logger.notice("no io_uring per event loop (\(error)): I/O goes through the target's own client")
                loopIO.withLockedValue { $0 = [:] }
            }
        }
        return ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            // The end of the client's stream (its half-close, or ours when
            // the server stops) is an event, not a close: the requests read
            // so far are still answered.
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            // Large replies (1 MiB reads) go out in fewer system calls.
            .childChannelOption(.socketOption(.so_sndbuf), value: 4 << 20)
            .childChannelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 64 << 10, maximum: 256 << 10))
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture { try track(channel) }
            }
    }

    private func accepted(_ channel: Channel, _ address: ListenAddress) -> ListenAddress {
        listeners.withLockedValue { $0.append(channel) }
        if case .tcp(let host, _) = address, let port = channel.localAddress?.port {
            return .tcp(host: host, port: port)
        }
        return address
    }

    private func track(_ channel: Channel) throws {
        let id = ObjectIdentifier(channel)
        connections.withLockedValue {
            $0[id] = channel
            spreadLargeWrites(connections: $0)
        }
        let peer = Event.Field("peer", channel.remoteAddress.map { "\($0)" } ?? "unix")
        events?.publish(Event("connection", "opened", [peer]))
        channel.closeFuture.whenComplete { [self] _ in
            connections.withLockedValue {
                $0.removeValue(forKey: id)
                spreadLargeWrites(connections: $0)
            }
            events?.publish(Event("connection", "closed", [peer]))
        }
        var connectionLogger = logger
        connectionLogger[metadataKey: "connection"] = "\(channel.remoteAddress?.description ?? "unix")"
        let loop = ObjectIdentifier(channel.eventLoop)
        let io = loopIO.withLockedValue { $0?[loop]?.context } ?? .targetsOwn
        try Self.configure(channel, exports: exports, tls: tls, load: loads[loop]!, io: io, logger: connectionLogger)
    }

    /// Once a burst of requests is over, the memory it used goes back to
    /// the kernel: malloc keeps freed buffers (and is told to, for speed),
    /// so without this the server would stay at its peak for ever. The
    /// return runs off the loops: it walks every malloc arena.
    private static func watchMemory(of group: MultiThreadedEventLoopGroup,
                                    _ loads: [ObjectIdentifier: LoopLoad]) -> [RepeatedTask] {
        group.makeIterator().map { loop in
            let load = loads[ObjectIdentifier(loop)]!
            return loop.scheduleRepeatedTask(initialDelay: memoryWatchInterval, delay: memoryWatchInterval) { _ in
                guard load.burstEnded() else { return }
                load.dropSpares()
                DispatchQueue.global(qos: .utility).async { _ = dmio_return_free_memory() }
            }
        }
    }

    /// While some event loop has no connection, its core would be idle: the
    /// loops that have one hand large writes to files in memory to kernel
    /// workers (see `DMIOClient.offloadsLargeMemoryWrites`). Called under
    /// the connections' lock, so that each loop gets the settings in order.
    private func spreadLargeWrites(connections: [ObjectIdentifier: Channel]) {
        let busyLoops = Set(connections.values.map { ObjectIdentifier($0.eventLoop) })
        let offload = busyLoops.count < loopCount
        for io in loopIO.withLockedValue({ $0 ?? [:] }).values {
            io.loop.execute { io.client.offloadsLargeMemoryWrites = offload }
        }
    }

    /// Sets up a connection's pipeline: the handshake's decoder and
    /// handler, which hand over to the transmission phase's after NBD_OPT_GO.
    /// Its target requests run in `io`.
    static func configure(_ channel: Channel, exports: [Export], tls: ServerTLS? = nil,
                          load: LoopLoad = LoopLoad(bufferLimit: NBDServer.defaultBufferLimit),
                          io: IOContext = .targetsOwn, logger: Logger) throws {
        let handover = OptionDecoder.Handover()
        let optionDecoder = ByteToMessageHandler(OptionDecoder(handover: handover))
        let handshake = HandshakeHandler(exports: exports, tls: tls, handover: handover, logger: logger) { context, session in
            let framer = RequestFramer(maxPayload: session.export.target.blockSizes.maximumPayload, load: load)
            let transmission = TransmissionHandler(session: session, io: io, allocator: context.channel.allocator,
                                                   load: load, framer: framer, logger: logger)
            let pipeline = context.pipeline.syncOperations
            do {
                try pipeline.addHandlers([framer, transmission], position: .after(context.handler))
                // Bytes the client sent after its option, before the reply
                // (which the spec asks it to wait for), go to the framer as
                // requests when the option decoder leaves.
                pipeline.removeHandler(context: context, promise: nil)
                handover.next = .transmission
                pipeline.removeHandler(optionDecoder, promise: nil)
            } catch {
                logger.error("cannot start transmission: \(error)")
                context.close(promise: nil)
            }
        }
        try channel.pipeline.syncOperations.addHandlers([optionDecoder, handshake])
    }

    /// The connections open now.
    public var connectionCount: Int { connections.withLockedValue { $0.count } }

    /// Stops accepting, and lets every connection answer the requests it has
    /// read, however long the target takes (they are closed for reading,
    /// not cut): a stop never fails a request in flight. A connection whose
    /// client takes no replies is let go by its own stall watch. Says every
    /// few seconds what it waits for.
    public func shutdown() async {
        for listener in listeners.withLockedValue({ $0 }) {
            try? await listener.close()
        }
        var reading = Set<ObjectIdentifier>()
        var nextReport = ContinuousClock.now + .seconds(1)
        while true {
            // A connection accepted as the listeners closed joins late.
            let open = connections.withLockedValue { $0 }
            for (id, channel) in open where reading.insert(id).inserted {
                try? await channel.close(mode: .input)
            }
            let requests = await requestsInFlight()
            // Requests of a connection that went away are still at the target,
            // and answer on their loop: it must not stop before them.
            if open.isEmpty && requests == 0 { break }
            if ContinuousClock.now >= nextReport {
                logger.info("stopping: waiting for \(requests) requests in flight on \(open.count) connections")
                nextReport = ContinuousClock.now + .seconds(5)
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
        for task in memoryWatch { task.cancel() }
        for io in loopIO.withLockedValue({ $0 ?? [:] }).values {
            try? await io.reaper.close()
        }
        try? await group.shutdownGracefully()
    }

    /// The requests started and not yet answered, on every loop.
    private func requestsInFlight() async -> Int {
        var total = 0
        for loop in group.makeIterator() {
            let load = loads[ObjectIdentifier(loop)]!
            total += (try? await loop.submit { load.requestsInFlight }.get()) ?? 0
        }
        return total
    }
}
