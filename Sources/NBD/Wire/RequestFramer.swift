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
}

/// A write's data, left in the socket reads it arrived in: one slice when
/// it came in one read, several when it spanned reads (a 1 MiB write always
/// does). Gathering the slices into one buffer would copy every byte once
/// more before the legs copy it again. A slice keeps its whole read buffer
/// alive: the connection's limit on requests in flight bounds what that holds.
struct WritePayload: Equatable {
    private var first = ByteBuffer()
    /// Empty unless the write spanned reads (an empty array allocates nothing).
    private var rest: [ByteBuffer] = []
    private(set) var byteCount = 0

    mutating func append(_ slice: ByteBuffer) {
        if byteCount == 0 { first = slice } else { rest.append(slice) }
        byteCount += slice.readableBytes
    }

    /// The payload as DMIO memory: one buffer, or bio vectors over the
    /// slices. It points into the slices' storage, which does not move
    /// while the payload is alive: keep it until the I/O is done.
    func withMemory<Result>(_ body: (IOMemory) -> Result) -> Result {
        guard !rest.isEmpty else { return first.withUnsafeReadableBytes { body(.constant($0)) } }
        let vectors = ([first] + rest).map { slice in
            slice.withUnsafeReadableBytes {
                BioVec(page: UnsafeMutableRawPointer(mutating: $0.baseAddress!), offset: 0, length: $0.count)
            }
        }
        return body(.bioVectors(vectors))
    }
}

/// Frames transmission requests: a 28-byte header, and for a write its
/// payload. Not a ByteToMessageDecoder: that gathers a frame which spans
/// socket reads into one buffer, copying it (and the whole of the next
/// read with it); here a payload stays where it was read, as slices.
///
/// A wrong magic, or a write payload over `maxPayload` (which the server
/// would have to hold), is a protocol violation: the stream can no longer
/// be framed. The error goes down the pipeline, which closes the
/// connection, and nothing after it is framed.
final class RequestFramer: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = NBDRequest

    private let maxPayload: UInt32
    /// The start of a header that the last read ended in.
    private var partialHeader = ByteBuffer()
    /// A write whose header has come, and `missing` bytes of its payload not yet.
    private var awaitingPayload: (request: NBDRequest, missing: Int)?
    private var broken = false

    init(maxPayload: UInt32) {
        self.maxPayload = maxPayload
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !broken else { return }
        var input = unwrapInboundIn(data)
        do {
            while input.readableBytes > 0, let request = try nextRequest(from: &input) {
                context.fireChannelRead(wrapInboundOut(request))
            }
        } catch {
            broken = true
            context.fireErrorCaught(error)
        }
    }

    /// The next whole request from `input`; nil when `input` ends inside
    /// one, whose start is kept for the next read.
    private func nextRequest(from input: inout ByteBuffer) throws -> NBDRequest? {
        var request: NBDRequest
        let missing: Int
        if let awaiting = awaitingPayload.take() {
            (request, missing) = awaiting
        } else {
            guard let header = try nextHeader(from: &input) else { return nil }
            guard header.type == CommandType.write.rawValue else { return header }
            request = header
            request.payload = WritePayload()
            missing = Int(header.length)
        }
        let slice = input.readSlice(length: min(missing, input.readableBytes))!
        request.payload!.append(slice)
        guard slice.readableBytes == missing else {
            awaitingPayload = (request, missing - slice.readableBytes)
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
