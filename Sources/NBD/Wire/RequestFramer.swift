import DMIO
import NIOCore

/// One transmission request as it came off the wire. The type is kept raw:
/// an unknown command is answered with EINVAL, not dropped.
struct NBDRequest: Equatable {
    var flags: UInt16
    var type: UInt16
    var cookie: UInt64
    var offset: UInt64
    var length: UInt32
    /// The data of a write (and only of a write).
    var payload: WritePayload?

    /// What the request holds of the loop's room until it is done.
    var payloadBytes: Int { payload?.byteCount ?? 0 }
}

/// A write's data, left in the socket reads it arrived in: one slice when
/// it came in one read, several when it spanned reads (a 1 MiB write always
/// does). Gathering the slices into one buffer would copy every byte once
/// more before the legs copy it again. A slice keeps its whole read buffer
/// alive: the connection's limit on requests in flight bounds what that holds.
struct WritePayload: Equatable {
    /// One reference whatever the shape: a request is copied a few times
    /// between the framer and the command, and each copy counts it.
    private enum Slices: Equatable {
        case none
        case one(ByteBuffer)
        case many([ByteBuffer])
    }

    private var slices = Slices.none
    private(set) var byteCount = 0

    mutating func append(_ slice: ByteBuffer) {
        // An empty slice (a header that ended its read) is not kept: a
        // slice keeps its whole read buffer.
        guard slice.readableBytes > 0 else { return }
        switch slices {
        case .none:
            slices = .one(slice)
        case .one(let first):
            slices = .many([first, slice])
        case .many(var all):
            // Out of the enum first, so that the append does not copy the array.
            slices = .none
            all.append(slice)
            slices = .many(all)
        }
        byteCount += slice.readableBytes
    }

    /// The payload as DMIO memory: one buffer, or bio vectors over the
    /// slices. It points into the slices' storage, which does not move
    /// while the payload is alive: keep it until the I/O is done.
    func withMemory<Result>(_ body: (IOMemory) -> Result) -> Result {
        switch slices {
        case .none:
            return body(.buffer(UnsafeMutableRawBufferPointer(start: nil, count: 0)))
        case .one(let slice):
            return slice.withUnsafeReadableBytes { body(.constant($0)) }
        case .many(let all):
            let vectors = all.map { slice in
                slice.withUnsafeReadableBytes {
                    BioVec(page: UnsafeMutableRawPointer(mutating: $0.baseAddress!), offset: 0, length: $0.count)
                }
            }
            return body(.bioVectors(vectors))
        }
    }
}

/// What takes the requests a `RequestFramer` frames, in the order they came.
protocol RequestSink: AnyObject {
    func received(_ request: consuming NBDRequest)
}

/// Frames transmission requests: a 28-byte header, and for a write its
/// payload. Not a ByteToMessageDecoder: that gathers a frame which spans
/// socket reads into one buffer, copying it (and the whole of the next
/// read with it); here a payload stays where it was read, as slices.
///
/// A write's payload counts in the loop's buffered bytes from its header
/// on; the transmission handler gives them back. While the loop has no
/// room, no new request is framed and nothing more is read (the rest of
/// the read, and the end of the client's input, wait here), but a payload
/// already begun is read to its end: its bytes are counted already, and
/// only its end lets them go.
///
/// A wrong magic, or a write payload over `maxPayload` (which the server
/// would have to hold), is a protocol violation: the stream can no longer
/// be framed. The error goes down the pipeline, which closes the
/// connection, and nothing after it is framed.
///
/// Each request goes to its `sink` (the transmission handler, next in the
/// pipeline) by a direct call, not down the pipeline: there a request is
/// boxed (an allocation), copied twice and cast back, for every request.
final class RequestFramer: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Where the framing is in the client's stream.
    private enum State {
        /// Between requests, or inside a header that the last read ended in
        /// (its start so far is in `partialHeader`).
        case header
        /// Inside a write's payload: the request so far, and how many bytes
        /// of it are still to come.
        case payload(NBDRequest, missing: Int)
        /// At a boundary while the loop has no room: the bytes read since,
        /// and whether a read and the end of the client's input wait with them.
        case waitingForRoom(unframed: ByteBuffer, readHeld: Bool, inputClosedHeld: Bool)
        /// A protocol violation: nothing more is framed.
        case broken
        /// Held for a moment while a buffer of the state is changed, so
        /// that the state's own reference does not make the change a copy.
        case modifying
    }

    private let maxPayload: UInt32
    private let load: LoopLoad
    private var state = State.header
    /// The start of a header that the last read ended in: kept out of the
    /// state, so that looking at the state copies no buffer, and reused.
    private var partialHeader = ByteBuffer()
    private var context: ChannelHandlerContext?
    /// Where each request framed goes. Not counted: the sink sets itself
    /// from its own pipeline's `handlerAdded` and clears itself when
    /// removed, and requests are framed only while both are in the pipeline.
    unowned(unsafe) var sink: RequestSink?

    init(maxPayload: UInt32, load: LoopLoad) {
        self.maxPayload = maxPayload
        self.load = load
    }

    /// Whether a write's payload is being read: the transmission handler
    /// lets reads through for it whatever its own limits.
    var isInsidePayload: Bool {
        if case .payload = state { return true }
        return false
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    /// The connection is gone: the payload that did not arrive whole is
    /// given back, and what waited unframed is dropped.
    func handlerRemoved(context: ChannelHandlerContext) {
        if case .payload(let request, _) = state { load.give(Int(request.length)) }
        state = .broken
        load.stopWaiting(self)
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var input = unwrapInboundIn(data)
        switch state {
        case .broken:
            return
        case .waitingForRoom(var unframed, let readHeld, let inputClosedHeld):
            state = .modifying
            unframed.writeBuffer(&input)
            state = .waitingForRoom(unframed: unframed, readHeld: readHeld, inputClosedHeld: inputClosedHeld)
        case .header, .payload, .modifying:
            frame(&input, context)
        }
    }

    private func frame(_ input: inout ByteBuffer, _ context: ChannelHandlerContext) {
        do {
            while input.readableBytes > 0 {
                if case .header = state, !load.hasRoom {
                    state = .waitingForRoom(unframed: input, readHeld: false, inputClosedHeld: false)
                    waitForRoom(context)
                    return
                }
                guard let request = try nextRequest(from: &input) else { break }
                deliver(request)
            }
        } catch {
            state = .broken
            context.fireErrorCaught(error)
        }
    }

    private func deliver(_ request: consuming NBDRequest) {
        guard let sink else {
            assertionFailure("a request framed with no sink")
            return load.give(request.payloadBytes)
        }
        sink.received(request)
    }

    private func waitForRoom(_ context: ChannelHandlerContext) {
        let loop = NIOLoopBound(self, eventLoop: context.eventLoop)
        load.whenRoom(for: self) { loop.eventLoop.execute { loop.value.frameWaiting() } }
    }

    /// Room came back: frames what was read meanwhile, then reads on: for
    /// a read held here, or for the rest of a payload the framing began
    /// (the transmission handler may hold no read for it).
    private func frameWaiting() {
        guard let context,
              case .waitingForRoom(var input, let readHeld, let inputClosedHeld) = state
        else { return }
        state = .header
        frame(&input, context)
        context.fireChannelReadComplete()
        if case .waitingForRoom(let unframed, let readHeldSince, let inputClosedSince) = state {
            // No room again, a few requests on: what waited still waits.
            state = .waitingForRoom(unframed: unframed, readHeld: readHeld || readHeldSince,
                                    inputClosedHeld: inputClosedHeld || inputClosedSince)
            return
        }
        if inputClosedHeld {
            context.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        } else if readHeld || isInsidePayload {
            context.read()
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .waitingForRoom(let unframed, let readHeld, _) = state,
           let event = event as? ChannelEvent, case .inputClosed = event {
            state = .waitingForRoom(unframed: unframed, readHeld: readHeld, inputClosedHeld: true)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func read(context: ChannelHandlerContext) {
        if case .waitingForRoom(let unframed, _, let inputClosedHeld) = state {
            state = .waitingForRoom(unframed: unframed, readHeld: true, inputClosedHeld: inputClosedHeld)
        } else {
            context.read()
        }
    }

    /// The next whole request from `input`; nil when `input` ends inside
    /// one, whose start is kept for the next read.
    private func nextRequest(from input: inout ByteBuffer) throws -> NBDRequest? {
        if case .payload(let awaiting, let missing) = state {
            state = .header
            return payload(of: awaiting, missing: missing, from: &input)
        }
        guard let header = try nextHeader(from: &input) else { return nil }
        guard header.type == CommandType.write.rawValue else { return header }
        load.take(Int(header.length))
        return payload(of: header, missing: Int(header.length), from: &input)
    }

    /// Takes what `input` holds of a write's payload, of which `missing`
    /// bytes are still to come; nil when it ends before the payload does.
    /// The request is moved in and out, not copied: its slices are counted
    /// references.
    private func payload(of request: consuming NBDRequest, missing: Int, from input: inout ByteBuffer) -> NBDRequest? {
        let slice = input.readSlice(length: min(missing, input.readableBytes))!
        var payload = request.payload.take() ?? WritePayload()
        payload.append(slice)
        request.payload = consume payload
        guard slice.readableBytes == missing else {
            state = .payload(request, missing: missing - slice.readableBytes)
            return nil
        }
        return request
    }

    /// The next request header, parsed in place when the read holds all of
    /// it, else once its pieces are put together.
    private func nextHeader(from input: inout ByteBuffer) throws -> NBDRequest? {
        if partialHeader.readableBytes == 0 && input.readableBytes >= WireSize.requestHeader {
            return try header(from: &input)
        }
        var piece = input.readSlice(length: min(WireSize.requestHeader - partialHeader.readableBytes,
                                                input.readableBytes))!
        partialHeader.writeBuffer(&piece)
        guard partialHeader.readableBytes == WireSize.requestHeader else { return nil }
        defer { partialHeader.clear() }
        return try header(from: &partialHeader)
    }

    private func header(from bytes: inout ByteBuffer) throws -> NBDRequest {
        let magic = bytes.readInteger(as: UInt32.self)!
        guard magic == Magic.request else { throw NBDProtocolError.badRequestMagic(magic) }
        let request = NBDRequest(flags: bytes.readInteger()!, type: bytes.readInteger()!, cookie: bytes.readInteger()!,
                                 offset: bytes.readInteger()!, length: bytes.readInteger()!, payload: nil)
        if request.type == CommandType.write.rawValue, request.length > maxPayload {
            throw NBDProtocolError.payloadTooLarge(request.length)
        }
        return request
    }
}
