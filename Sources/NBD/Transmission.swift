import BlockTargets
import Glibc
import Logging
import NIOCore
import NIOSSL

/// The transmission phase of one connection: checks each request
/// (`validate`), runs it on the target, and sends the replies, in whatever
/// order the target completes them. What starts when, when the socket is
/// read and when the connection closes is decided by its state machine
/// (`TransmissionStateMachine`); this handler carries it out on the channel.
///
/// Replies of one batch (one socket read, or one set of completions) go
/// into one buffer and out in one write and one flush. Target completions
/// arrive on storage threads and come back to the event loop in batches
/// (`CompletionInbox`). While too many requests or bytes are in flight, or
/// the client does not read its replies, the handler stops reading from
/// the socket, and requests already read wait, in order, until replies
/// make room: one socket read can hold thousands of requests, and a read
/// request allocates its reply when it starts, so a connection's memory
/// stays bounded whatever the client sends. The server's memory is bounded
/// too: reads also wait while their event loop's connections buffer their
/// share of the server's bound (`LoopLoad`), and so does what comes after
/// them, except writes: their payloads are held already, and only their
/// end gives the room back.
final class TransmissionHandler: ChannelDuplexHandler, RequestSink {
    /// Requests come from the framer by a direct call (`received`).
    typealias InboundIn = Never
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Limits of one connection before it stops reading requests.
    static let maxRequestsInFlight = 128
    static let maxBytesInFlight = 64 << 20
    /// Read replies at least this long go out as their own buffer rather
    /// than being copied into the batch buffer.
    static let directReplyBytes = 64 << 10
    /// Structured reads at least this long first ask whether the range is
    /// a hole, and answer a hole without reading it.
    static let sparseReadBytes = 64 << 10
    /// A block status reply carries at most this many extents per meta
    /// context (the spec lets a reply cover less than asked; the client asks
    /// again from where it ended): each costs the loop up to two lseek
    /// calls, and a walk of 65,536 per request, from many clients, stalled
    /// a loop for tens of seconds.
    static let maxExtentsPerReply = 1024
    /// How long a closing connection waits for its client to take the last
    /// replies.
    static let closeGrace = TimeAmount.seconds(10)

    private let session: Session
    private let target: BlockTarget
    /// Where the target's I/O goes: this loop's own DMIO client.
    private let io: IOContext
    private let logger: Logger
    private let inbox = CompletionInbox<Completed, TransmissionHandler>(
        deliver: { $0.finish($1) }, afterBatch: { $0.resume() })
    /// What this loop's connections hold: requests in flight, which a stop
    /// waits for, and buffered bytes, which the server bounds.
    private let load: LoopLoad
    private let framer: RequestFramer
    private var state = TransmissionStateMachine(limits: .init(requests: TransmissionHandler.maxRequestsInFlight,
                                                               bytes: TransmissionHandler.maxBytesInFlight))
    private let allocator: ByteBufferAllocator
    private var output: ByteBuffer
    private var pendingFlush = false
    /// The channel's writability, as its events say: asking the channel
    /// costs reference counting on every request.
    private var writable = true
    /// Once the input has ended or NBD_CMD_DISC came: closes a connection
    /// whose client takes no reply for `closeGrace`.
    private var stallWatch: RepeatedTask?
    /// This connection's context, and the handler as storage threads may
    /// hold it: it is only ever used back on the event loop.
    private var context: ChannelHandlerContext!
    private var onLoop: NIOLoopBound<TransmissionHandler>!

    init(session: Session, io: IOContext, allocator: ByteBufferAllocator, load: LoopLoad, framer: RequestFramer,
         logger: Logger) {
        self.session = session
        self.target = session.export.target
        self.io = io
        self.load = load
        self.framer = framer
        self.logger = logger
        self.allocator = allocator
        output = allocator.buffer(capacity: 64 << 10)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        onLoop = NIOLoopBound(self, eventLoop: context.eventLoop)
        writable = context.channel.isWritable
        inbox.attach(self, loop: context.eventLoop)
        framer.sink = self
    }

    /// Breaks the handler's references to itself and to its context, so
    /// that it and its buffers go with the connection (completions still
    /// in flight hold it until they come).
    func handlerRemoved(context: ChannelHandlerContext) {
        stallWatch?.cancel()
        framer.sink = nil
        self.context = nil
        onLoop = nil
        load.stopWaiting(self)
        state.connectionGone()
        giveBackDropped()
        detachWhenIdle()
    }

    /// Once the connection is gone and no request is in flight, no
    /// completion can come: the inbox lets the handler go.
    private func detachWhenIdle() {
        if context == nil && state.requestsInFlight == 0 { inbox.detach() }
    }

    /// Requests read and never started (the connection is gone, or they
    /// came after NBD_CMD_DISC) give their payloads back.
    private func giveBackDropped() {
        for request in state.takeDropped() { load.give(request.payloadBytes) }
    }

    // MARK: Inbound

    func received(_ request: consuming NBDRequest) {
        let payloadBytes = request.payloadBytes
        switch state.received(consume request, loopHasRoom: load.hasRoom, writable: writable) {
        case .start(let request): start(request)
        case .queued: startWaiting()
        case .dropped: load.give(payloadBytes)
        }
    }

    /// Starts the requests that waited, as far as the state machine lets
    /// them; when some wait for room, asks the loop to say when it has some.
    private func startWaiting() {
        starting: while true {
            let next = state.next(loopHasRoom: load.hasRoom, writable: writable)
            switch consume next {
            case .start(let request): start(request)
            case .dropped: giveBackDropped()
            case .none: break starting
            }
        }
        giveBackDropped()
        // Short of anything but room, a completion or the client's taking
        // replies resumes the connection.
        if state.needsWakeWhenRoom(loopHasRoom: load.hasRoom) {
            let handler = onLoop!
            load.whenRoom(for: self) { handler.eventLoop.execute { handler.value.roomCameBack() } }
        }
    }

    private func roomCameBack() {
        state.roomCameBack()
        resume()
    }

    private func start(_ request: consuming NBDRequest) {
        if state.starting() { target.beginBatch(context: io) }
        let (cookie, flags, payloadBytes) = (request.cookie, CommandFlags(rawValue: request.flags), request.payloadBytes)
        switch validate(request, session: session) {
        case .failure(let rejection):
            logger.debug("request refused: \(rejection.message)")
            load.give(payloadBytes)
            appendError(rejection, cookie: cookie)
        case .success(let command):
            run(command, cookie: cookie, flags: flags)
        }
        writeOutputIfFull()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        endBatch()
        flushOutput(context)
        context.fireChannelReadComplete()
    }

    func channelInactive(context: ChannelHandlerContext) {
        endBatch()
        state.channelInactive()
        if state.requestsInFlight > 0 {
            logger.debug("client went away with \(state.requestsInFlight) requests in flight")
        }
        context.fireChannelInactive()
    }

    /// The input ended (the server is stopping, or the client half-closed):
    /// answer every request read, then close.
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, case .inputClosed = event {
            state.inputClosed()
            watchForStall(context)
            closeIfDone(context)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        // This runs inside the write or flush that changed it: starting
        // requests there would append replies to a batch being written.
        writable = context.channel.isWritable
        if writable {
            let handler = onLoop!
            context.eventLoop.execute { handler.value.resume() }
        }
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if case NIOSSLError.uncleanShutdown = error {
            // A TLS client that went without close_notify (qemu does): the
            // end of its input follows, and what it sent is answered first,
            // as after a plaintext half-close.
            logger.debug("the client ended TLS without close_notify")
            return
        }
        logger.notice("closing connection: \(error)")
        context.close(promise: nil)
    }

    // MARK: Outbound: backpressure

    private func endBatch() {
        if state.endBatch() { target.endBatch(context: io) }
    }

    func read(context: ChannelHandlerContext) {
        if state.readRequested(insidePayload: framer.isInsidePayload, writable: writable) {
            context.read()
        }
    }

    private func releaseHeldRead(_ context: ChannelHandlerContext) {
        if state.releaseHeldRead(insidePayload: framer.isInsidePayload, writable: writable) {
            context.read()
        }
    }

    // MARK: Running commands

    /// Runs `command`; `flags` are its request's, for the error it may get.
    private func run(_ command: consuming Command, cookie: UInt64, flags: CommandFlags) {
        switch consume command {
        case .nothing(let isRead):
            // A read's reply is structured whenever structured replies are on.
            if isRead && session.structuredReplies {
                output.writeNoneChunk(cookie: cookie)
            } else {
                appendSuccess(cookie: cookie)
            }
        case .disconnect:
            logger.debug("client disconnects")
            state.disconnect()
            watchForStall(context)
            closeIfDone(context)
        case .read(let offset, let length):
            read(offset: offset, length: length, cookie: cookie, flags: flags)
        case .write(let offset, let payload, let fua):
            // The framer took the payload's bytes from the loop's room.
            started(bytes: payload.byteCount)
            // The completion keeps the payload alive until the target is done with it.
            let completion = complete("write", cookie, flags, holding: .payload(payload))
            payload.withMemory { target.write($0, offset: offset, fua: fua, context: io, completion: completion) }
        case .flush:
            started(bytes: 0)
            target.flush(context: io, completion: complete("flush", cookie, flags))
        case .trim(let offset, let length, let fua):
            started(bytes: 0)
            target.trim(offset: offset, length: UInt64(length), fua: fua, context: io,
                        completion: complete("trim", cookie, flags))
        case .writeZeroes(let offset, let length, let mayUnmap, let fua):
            started(bytes: 0)
            target.writeZeroes(offset: offset, length: UInt64(length), mayUnmap: mayUnmap, fua: fua, context: io,
                               completion: complete("write-zeroes", cookie, flags))
        case .cache(let offset, let length):
            started(bytes: 0)
            target.cache(offset: offset, length: UInt64(length), context: io, completion: complete("cache", cookie, flags))
        case .blockStatus(let offset, let length, let onlyOne):
            blockStatus(offset: offset, length: length, onlyOne: onlyOne, cookie: cookie, flags: flags)
        }
    }

    private func read(offset: UInt64, length: UInt32, cookie: UInt64, flags: CommandFlags) {
        let count = Int(length)
        if session.structuredReplies && count >= Self.sparseReadBytes,
           target.readsAsZeroes(offset: offset, length: UInt64(length)) {
            output.writeHoleChunk(offset: offset, length: length, cookie: cookie, done: true)
            return
        }
        var reply = replyBuffer(capacity: WireSize.structuredReplyHeader + 8 + count)
        if session.structuredReplies {
            reply.writeChunkHeader(flags: ChunkFlag.done, type: .offsetData, cookie: cookie, length: 8 + count)
            reply.writeInteger(offset)
        } else {
            reply.writeSimpleReply(error: 0, cookie: cookie)
        }
        let headerLength = reply.readableBytes
        // Reserve the data's room now; the target fills it in place, and the
        // buffer is not touched (so not moved) until the target completes.
        reply.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { _ in count }
        let data = reply.withUnsafeMutableReadableBytes {
            UnsafeMutableRawBufferPointer(rebasing: $0[headerLength...])
        }
        started(bytes: reply.readableBytes)
        load.take(reply.readableBytes)
        target.read(into: data, offset: offset, context: io, completion: complete("read", cookie, flags, holding: .reply(reply)))
    }

    private func blockStatus(offset: UInt64, length: UInt32, onlyOne: Bool, cookie: UInt64, flags: CommandFlags) {
        do {
            let maxExtents = onlyOne ? 1 : Self.maxExtentsPerReply
            // Every context is asked before any chunk goes out: an error then
            // answers the whole request.
            let replies = try session.metaContexts.map { context in
                let extents = context.isBaseAllocation
                    ? try target.allocation(offset: offset, length: UInt64(length), maxExtents: maxExtents)
                    : try target.blockStatus(context: context.name, offset: offset, length: UInt64(length),
                                             maxExtents: maxExtents)
                return (context.id, extents)
            }
            for (index, (id, extents)) in replies.enumerated() {
                output.writeBlockStatusChunk(contextID: id, extents: extents, cookie: cookie,
                                             done: index == replies.count - 1)
            }
        } catch {
            appendFailure(error as? TargetResult ?? TargetResult(errno: EIO, message: "\(error)"),
                          command: "block status", cookie: cookie, flags: flags)
        }
    }

    /// The completion of one command: brings the result back to the event
    /// loop and answers with a read's filled buffer or a bare success. A
    /// write's data is kept alive until the target is done with it.
    private func complete(_ command: StaticString, _ cookie: UInt64, _ flags: CommandFlags,
                          holding held: Completed.Held = .nothing) -> TargetCompletion {
        return { [inbox] result in
            inbox.post(Completed(command: command, cookie: cookie, flags: flags, result: result, held: held))
        }
    }

    /// One command's end, on its way from a storage thread to the loop. The
    /// inbox holds the handler until the last: a connection gone meanwhile
    /// still gives its bytes back.
    private struct Completed {
        /// What the command holds until its end: one reference at most,
        /// counted each time the completion is copied.
        enum Held {
            case nothing
            case reply(ByteBuffer)
            case payload(WritePayload)
        }

        let command: StaticString
        let cookie: UInt64
        let flags: CommandFlags
        let result: TargetResult
        let held: Held

        /// The bytes it held of the connection's and the loop's room.
        var bytes: Int {
            switch held {
            case .nothing: 0
            case .reply(let reply): reply.readableBytes
            case .payload(let payload): payload.byteCount
            }
        }
    }

    private func finish(_ completed: Completed) {
        finished(bytes: completed.bytes)
        // A reply's bytes count again while the socket has them (`send`).
        load.give(completed.bytes)
        guard state.isActive else { return detachWhenIdle() }
        if !completed.result.succeeded {
            appendFailure(completed.result, command: "\(completed.command)", cookie: completed.cookie,
                          flags: completed.flags)
        } else if case .reply(let reply) = completed.held {
            appendReply(reply)
        } else {
            appendSuccess(cookie: completed.cookie)
        }
        writeOutputIfFull()
    }

    private func started(bytes: Int) {
        state.started(bytes: bytes)
        load.requestsInFlight += 1
    }

    private func finished(bytes: Int) {
        state.finished(bytes: bytes)
        load.requestsInFlight -= 1
    }

    /// Room was made (replies done, or taken by the client): starts the
    /// requests that waited, as far as it goes (none after a disconnect),
    /// sends the replies, and reads on if nothing waits any more.
    private func resume() {
        guard state.isActive else { return }
        state.progress()
        startWaiting()
        endBatch()
        flushOutput(context)
        releaseHeldRead(context)
        closeIfDone(context)
    }

    /// With nothing more to read, only the client's taking its replies lets
    /// the connection finish once the target has answered: one that takes
    /// none for `closeGrace` is let go (a half-closed client that never reads
    /// would hold it for ever). A slow target is waited for, however long.
    private func watchForStall(_ context: ChannelHandlerContext) {
        guard stallWatch == nil else { return }
        state.watchingForStall()
        let handler = onLoop!
        stallWatch = context.eventLoop.scheduleRepeatedTask(initialDelay: Self.closeGrace, delay: Self.closeGrace) { _ in
            handler.value.closeIfStalled()
        }
    }

    private func closeIfStalled() {
        guard state.stallCheck() else { return }
        logger.notice("closing connection: its input ended and it took no reply for \(Self.closeGrace.nanoseconds / 1_000_000_000) s")
        context.close(promise: nil)
    }

    /// After NBD_CMD_DISC, or once the server stops reading, the connection
    /// closes when every request read has been answered and the replies
    /// have gone out (a close drops replies still queued in the channel):
    /// or after `closeGrace`, for a client that does not take them.
    private func closeIfDone(_ context: ChannelHandlerContext) {
        guard state.closeIfDone() else { return }
        writeOutput(context)
        let sent = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(wrapOutboundOut(ByteBuffer()), promise: sent)
        let channel = context.channel
        let grace = context.eventLoop.scheduleTask(in: Self.closeGrace) { channel.close(promise: nil) }
        sent.futureResult.whenComplete { _ in
            grace.cancel()
            channel.close(promise: nil)
        }
    }

    // MARK: Replies

    private func appendSuccess(cookie: UInt64) {
        output.writeSimpleReply(error: 0, cookie: cookie)
    }

    /// The error reply of a request the target failed, whose cause goes to the log.
    private func appendFailure(_ result: TargetResult, command: String, cookie: UInt64, flags: CommandFlags) {
        let rejection = nbdError(for: result, flags: flags)
        logger.warning("\(command) failed: \(rejection.message) (errno \(result.errno)), replying \(rejection.error)")
        appendError(rejection, cookie: cookie)
    }

    private func appendError(_ rejection: Rejection, cookie: UInt64) {
        if session.structuredReplies {
            output.writeErrorChunk(error: rejection.error.rawValue, message: rejection.message, cookie: cookie)
        } else {
            // A simple read reply carries no data after an error.
            output.writeSimpleReply(error: rejection.error.rawValue, cookie: cookie)
        }
    }

    private func appendReply(_ reply: ByteBuffer) {
        var reply = reply
        if reply.readableBytes >= Self.directReplyBytes {
            writeOutput(context)
            send(reply, reuse: true)
        } else {
            output.writeBuffer(&reply)
        }
    }

    /// A buffer for a reply of `capacity` bytes: a spare one of the loop's
    /// when a large reply's buffer is free again.
    private func replyBuffer(capacity: Int) -> ByteBuffer {
        if capacity >= Self.directReplyBytes, let spare = load.spareReplyBuffer(capacity: capacity) { return spare }
        return allocator.buffer(capacity: capacity)
    }

    /// Puts `buffer` into the channel; its bytes count in the loop's room
    /// until the socket has taken them (a client that takes no replies
    /// holds them). With `reuse`, the buffer is kept for a later reply.
    private func send(_ buffer: ByteBuffer, reuse: Bool) {
        let bytes = buffer.readableBytes
        load.take(bytes)
        let sent = context.eventLoop.makePromise(of: Void.self)
        context.write(wrapOutboundOut(buffer), promise: sent)
        sent.futureResult.whenComplete { [load] result in
            load.give(bytes)
            if reuse, case .success = result { load.keepForReuse(buffer) }
        }
        pendingFlush = true
    }

    /// The reply batch goes into the channel once it is this long, so that
    /// the channel's writability counts it.
    private func writeOutputIfFull() {
        if output.readableBytes >= Self.directReplyBytes { writeOutput(context) }
    }

    private func writeOutput(_ context: ChannelHandlerContext) {
        guard output.readableBytes > 0 else { return }
        send(output, reuse: false)
        output.clear()
    }

    private func flushOutput(_ context: ChannelHandlerContext) {
        writeOutput(context)
        if pendingFlush {
            pendingFlush = false
            context.flush()
        }
    }
}
