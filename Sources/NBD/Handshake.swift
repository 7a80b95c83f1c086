import Logging
import NIOCore
import NIOSSL

/// What the handshake settled, handed to the transmission phase.
struct Session {
    let export: Export
    let structuredReplies: Bool
    let metaContexts: [MetaContext]
    /// What the client was told the export can do, fixed for the
    /// connection even if the target's capabilities change later.
    let flags: TransmissionFlags

    init(export: Export, structuredReplies: Bool, metaContexts: [MetaContext]) {
        self.export = export
        self.structuredReplies = structuredReplies
        self.metaContexts = metaContexts
        flags = export.transmissionFlags(structuredReplies: structuredReplies)
    }
}

/// The fixed newstyle handshake: greets the client, carries out what
/// `HandshakeStateMachine` decides for each of its options (TLS included),
/// and on NBD_OPT_GO or NBD_OPT_EXPORT_NAME hands the connection to the
/// transmission phase.
final class HandshakeHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HandshakeMessage
    typealias OutboundOut = ByteBuffer

    /// A client that has not finished its handshake by then is dropped: an
    /// idle or stuck connection would hold its socket for ever (qemu-nbd's
    /// --handshake-limit, 10 s there; longer here for clients in option mode
    /// driven by hand). A TLS handshake is part of it.
    static let timeLimit = TimeAmount.seconds(30)
    /// A client with this many bytes of option replies it has not taken is
    /// dropped: each reply is small, so only a client that sends options
    /// and never reads gets there, and its replies would pile up without
    /// end until the time limit.
    static let maxUnsentReplyBytes = 1 << 20

    private var machine: HandshakeStateMachine
    private let tls: ServerTLS?
    private let handover: OptionDecoder.Handover
    private let logger: Logger
    private let startTransmission: (ChannelHandlerContext, Session) -> Void
    private var timeLimitTask: Scheduled<Void>?
    private var unsentReplyBytes = 0
    private var dropped = false

    /// `startTransmission` installs the transmission phase's handlers;
    /// `handover` tells the option decoder what its bytes belong to.
    init(exports: [Export], tls: ServerTLS?, handover: OptionDecoder.Handover, logger: Logger,
         startTransmission: @escaping (ChannelHandlerContext, Session) -> Void) {
        machine = HandshakeStateMachine(exports: exports, tls: tls?.policy ?? .off)
        self.tls = tls
        self.handover = handover
        self.logger = logger
        self.startTransmission = startTransmission
    }

    func channelActive(context: ChannelHandlerContext) {
        var greeting = context.channel.allocator.buffer(capacity: 18)
        greeting.writeGreeting()
        context.writeAndFlush(wrapOutboundOut(greeting), promise: nil)
        let channel = context.channel
        let logger = logger
        timeLimitTask = context.eventLoop.scheduleTask(in: Self.timeLimit) {
            logger.notice("handshake: not finished within \(Self.timeLimit.nanoseconds / 1_000_000_000) s; closing connection")
            channel.close(promise: nil)
        }
        context.fireChannelActive()
    }

    /// The handshake is over (the transmission phase took the connection)
    /// or the connection is gone: no time limit any more.
    func handlerRemoved(context: ChannelHandlerContext) {
        timeLimitTask?.cancel()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // The options that came in the same read as the one that got the
        // client dropped are not answered.
        guard !dropped else { return }
        switch unwrapInboundIn(data) {
        case .clientFlags(let flags): run(context, machine.receive(clientFlags: flags))
        case .option(let option): run(context, machine.receive(option))
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if error is NIOSSLError || error is BoringSSLError {
            close(context, "TLS handshake failed: \(error)")
        } else {
            close(context, "\(error)")
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // The server is stopping: nothing is in flight during the handshake.
        if let event = event as? ChannelEvent, case .inputClosed = event {
            context.close(promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    private func run(_ context: ChannelHandlerContext, _ action: HandshakeStateMachine.Action) {
        switch action {
        case .none:
            break
        case .answer(let code, let answer):
            reply(context) { $0.writeAnswer(code, answer) }
        case .answerAndClose(let code, let answer):
            logger.debug("handshake: client aborted")
            reply(context) { $0.writeAnswer(code, answer) }
            dropped = true
            context.close(promise: nil)
        case .close(let why):
            close(context, why)
        case .startTLS(let code):
            reply(context) { $0.writeAnswer(code, .ack) }
            startTLS(context)
        case .enterTransmission(let session, let entry):
            reply(context) { buffer in
                switch entry {
                case .go(let code, let requests):
                    buffer.writeAnswer(code, .info(session, requests: requests))
                case .exportName(let zeroes):
                    buffer.writeExportNameReply(size: session.export.target.size, flags: session.flags, zeroes: zeroes)
                }
            }
            // Dropped by its last reply (see `reply`): the connection is closing.
            guard !dropped else { return }
            logger.debug("handshake: entering transmission, export \"\(session.export.name)\", structured replies \(session.structuredReplies)")
            startTransmission(context, session)
        }
    }

    /// Puts TLS in front of the pipeline, behind the acknowledgement just
    /// written (which went out in plaintext, as the spec asks). What the
    /// option decoder still holds came before the client saw it, so was not
    /// encrypted by the client: the decoder drops it.
    private func startTLS(_ context: ChannelHandlerContext) {
        guard let tls, !dropped else { return }
        handover.next = .tls
        do {
            try context.pipeline.syncOperations.addHandlers(tls.makeHandlers(), position: .first)
        } catch {
            close(context, "cannot start TLS: \(error)")
        }
    }

    private func close(_ context: ChannelHandlerContext, _ why: String) {
        logger.notice("handshake: \(why); closing connection")
        dropped = true
        context.close(promise: nil)
    }

    private func reply(_ context: ChannelHandlerContext, _ write: (inout ByteBuffer) -> Void) {
        var buffer = context.channel.allocator.buffer(capacity: 64)
        write(&buffer)
        let bytes = buffer.readableBytes
        guard unsentReplyBytes + bytes <= Self.maxUnsentReplyBytes else {
            logger.notice("handshake: the client takes none of its option replies (\(unsentReplyBytes) bytes unsent); closing connection")
            dropped = true
            context.close(promise: nil)
            return
        }
        unsentReplyBytes += bytes
        let sent = context.eventLoop.makePromise(of: Void.self)
        sent.futureResult.whenComplete { [self] _ in unsentReplyBytes -= bytes }
        context.writeAndFlush(wrapOutboundOut(buffer), promise: sent)
    }
}
