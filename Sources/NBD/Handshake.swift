import Logging
import NIOCore

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

/// The fixed newstyle handshake: greets the client, answers its options,
/// and on NBD_OPT_GO or NBD_OPT_EXPORT_NAME hands the connection to the
/// transmission phase.
final class HandshakeHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HandshakeMessage
    typealias OutboundOut = ByteBuffer

    /// A client that has not finished its handshake by then is dropped: an
    /// idle or stuck connection would hold its socket for ever (qemu-nbd's
    /// --handshake-limit, 10 s there; longer here for clients in option mode
    /// driven by hand).
    static let timeLimit = TimeAmount.seconds(30)
    /// A client with this many bytes of option replies it has not taken is
    /// dropped: each reply is small, so only a client that sends options
    /// and never reads gets there, and its replies would pile up without
    /// end until the time limit.
    static let maxUnsentReplyBytes = 1 << 20

    private let exports: [Export]
    private let logger: Logger
    private let startTransmission: (ChannelHandlerContext, Session) -> Void
    private var timeLimitTask: Scheduled<Void>?
    private var noZeroes = false
    private var structuredReplies = false
    /// Set by NBD_OPT_SET_META_CONTEXT, for the export it named.
    private var metaContexts: (export: String, contexts: [MetaContext])?
    private var unsentReplyBytes = 0
    private var dropped = false

    /// `startTransmission` installs the transmission phase's handlers.
    init(exports: [Export], logger: Logger,
         startTransmission: @escaping (ChannelHandlerContext, Session) -> Void) {
        self.exports = exports
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
        case .clientFlags(let flags):
            let known = HandshakeFlag.clientFixedNewstyle | HandshakeFlag.clientNoZeroes
            guard flags & ~known == 0 else {
                // The spec: a server MUST drop the connection on unknown flags.
                fail(context, NBDProtocolError.unknownClientFlags(flags))
                return
            }
            noZeroes = flags & HandshakeFlag.clientNoZeroes != 0
        case .option(let option):
            handle(context, option)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        fail(context, error)
    }

    /// The server is stopping: nothing is in flight during the handshake.
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, case .inputClosed = event {
            context.close(promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    private func fail(_ context: ChannelHandlerContext, _ error: Error) {
        logger.notice("handshake: closing connection: \(error)")
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

    private func export(named name: String) -> Export? {
        if name.isEmpty { return exports.first }
        return exports.first { $0.name == name }
    }

    /// The server's policy for each option: what it answers, what it
    /// remembers for transmission.
    private func handle(_ context: ChannelHandlerContext, _ option: ClientOption) {
        let code = option.code
        switch option {
        case .exportName(let name):
            exportName(context, name)
        case .abort:
            logger.debug("handshake: client aborted")
            reply(context) { $0.writeOptionReply(code, .ack) }
            context.close(promise: nil)
        case .list:
            reply(context) { buffer in
                for export in exports {
                    buffer.writeServerReply(code, name: export.name, description: export.description)
                }
                buffer.writeOptionReply(code, .ack)
            }
        case .startTLS:
            reply(context) { $0.writeOptionError(code, .errPolicy, message: "TLS is not configured on this server") }
        case .info(let request):
            info(context, code, request, thenGo: false)
        case .go(let request):
            info(context, code, request, thenGo: true)
        case .structuredReply:
            structuredReplies = true
            reply(context) { $0.writeOptionReply(code, .ack) }
        case .listMetaContext(let request):
            metaContext(context, code, request, listing: true)
        case .setMetaContext(let request):
            metaContext(context, code, request, listing: false)
        case .unknown:
            reply(context) { $0.writeOptionError(code, .errUnsupported, message: "unknown option \(code)") }
        case .malformed(_, let why):
            let isMetaContext = code == OptionCode.listMetaContext.rawValue || code == OptionCode.setMetaContext.rawValue
            if isMetaContext && !structuredReplies { return needStructuredReplies(context, code) }
            // A failed NBD_OPT_SET_META_CONTEXT leaves no context selected.
            if code == OptionCode.setMetaContext.rawValue { metaContexts = nil }
            invalid(context, code, why)
        case .tooBig:
            reply(context) { $0.writeOptionError(code, .errTooBig, message: "option data too large") }
        }
    }

    private func invalid(_ context: ChannelHandlerContext, _ code: UInt32, _ message: String) {
        reply(context) { $0.writeOptionError(code, .errInvalid, message: message) }
    }

    private func needStructuredReplies(_ context: ChannelHandlerContext, _ code: UInt32) {
        invalid(context, code, "meta contexts need NBD_OPT_STRUCTURED_REPLY first")
    }

    private func exportName(_ context: ChannelHandlerContext, _ name: String) {
        guard let export = export(named: name) else {
            // NBD_OPT_EXPORT_NAME cannot carry an error: the spec says to
            // drop the connection.
            logger.notice("handshake: unknown export \"\(name)\" asked by NBD_OPT_EXPORT_NAME")
            context.close(promise: nil)
            return
        }
        let session = Session(export: export, structuredReplies: structuredReplies,
                              metaContexts: selectedContexts(for: name))
        reply(context) { $0.writeExportNameReply(size: export.target.size, flags: session.flags, zeroes: !noZeroes) }
        enterTransmission(context, session)
    }

    /// NBD_OPT_INFO, or with `thenGo` NBD_OPT_GO.
    private func info(_ context: ChannelHandlerContext, _ code: UInt32, _ request: ClientOption.ExportRequest,
                      thenGo: Bool) {
        guard let export = export(named: request.name) else {
            reply(context) { $0.writeOptionError(code, .errUnknown, message: "no export named \"\(request.name)\"") }
            return
        }
        let session = Session(export: export, structuredReplies: structuredReplies,
                              metaContexts: selectedContexts(for: request.name))
        reply(context) { buffer in
            buffer.writeExportInfo(code, size: export.target.size, flags: session.flags)
            if request.requests.contains(InfoType.name.rawValue) {
                buffer.writeTextInfo(code, .name, export.name)
            }
            if request.requests.contains(InfoType.description.rawValue), let description = export.description {
                buffer.writeTextInfo(code, .description, description)
            }
            // Sent whether asked or not: the minimum block size is not the
            // protocol's default of 1, and clients ignore what they did not ask.
            buffer.writeBlockSizeInfo(code, export.target.blockSizes)
            buffer.writeOptionReply(code, .ack)
        }
        if thenGo { enterTransmission(context, session) }
    }

    private func metaContext(_ context: ChannelHandlerContext, _ code: UInt32,
                             _ request: ClientOption.MetaContextRequest, listing: Bool) {
        guard structuredReplies else { return needStructuredReplies(context, code) }
        guard let export = export(named: request.export) else {
            if !listing { metaContexts = nil }
            reply(context) { $0.writeOptionError(code, .errUnknown, message: "no export named \"\(request.export)\"") }
            return
        }
        let available = export.metaContexts
        var found: [MetaContext] = []
        if listing && request.queries.isEmpty {
            found = available
        } else {
            for query in request.queries {
                for match in MetaContext.matching(query, listing: listing, in: available) where !found.contains(match) {
                    found.append(match)
                }
            }
        }
        if !listing { metaContexts = (request.export, found) }
        reply(context) { buffer in
            for context in found {
                buffer.writeMetaContextReply(code, id: listing ? 0 : context.id, name: context.name)
            }
            buffer.writeOptionReply(code, .ack)
        }
    }

    /// The contexts the last NBD_OPT_SET_META_CONTEXT chose, if it named
    /// the export being entered.
    private func selectedContexts(for name: String) -> [MetaContext] {
        guard let metaContexts, metaContexts.export == name else { return [] }
        return metaContexts.contexts
    }

    private func enterTransmission(_ context: ChannelHandlerContext, _ session: Session) {
        // Dropped by its last reply (see `reply`): the connection is closing.
        guard !dropped else { return }
        logger.debug("handshake: entering transmission, export \"\(session.export.name)\", structured replies \(session.structuredReplies)")
        startTransmission(context, session)
    }
}
