import NIOCore

/// One transmission request as it came off the wire. The type is kept raw:
/// an unknown command is answered with EINVAL, not dropped.
struct NBDRequest: Equatable {
    var flags: UInt16
    var type: UInt16
    var cookie: UInt64
    var offset: UInt64
    var length: UInt32
    /// The data of a write.
    var payload: ByteBuffer?
}

/// Frames transmission requests: a 28-byte header, and for writes the
/// payload. A wrong magic is a protocol violation (the stream can no longer
/// be framed): the decoder throws and the connection is closed. So is a
/// write payload over `maxPayload`, which the server would have to buffer.
struct RequestDecoder: ByteToMessageDecoder {
    typealias InboundOut = NBDRequest

    let maxPayload: UInt32

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard buffer.readableBytes >= WireSize.requestHeader else { return .needMoreData }
        let start = buffer.readerIndex
        let magic = buffer.getInteger(at: start, as: UInt32.self)!
        guard magic == Magic.request else { throw NBDProtocolError.badRequestMagic(magic) }
        let type = buffer.getInteger(at: start + 6, as: UInt16.self)!
        let length = buffer.getInteger(at: start + 24, as: UInt32.self)!
        let hasPayload = type == CommandType.write.rawValue
        if hasPayload {
            guard length <= maxPayload else { throw NBDProtocolError.payloadTooLarge(length) }
            guard buffer.readableBytes >= WireSize.requestHeader + Int(length) else {
                return .needMoreData
            }
        }
        let request = NBDRequest(
            flags: buffer.getInteger(at: start + 4, as: UInt16.self)!,
            type: type,
            cookie: buffer.getInteger(at: start + 8, as: UInt64.self)!,
            offset: buffer.getInteger(at: start + 16, as: UInt64.self)!,
            length: length,
            payload: nil)
        buffer.moveReaderIndex(forwardBy: WireSize.requestHeader)
        var complete = request
        if hasPayload { complete.payload = buffer.readSlice(length: Int(length))! }
        context.fireChannelRead(wrapInboundOut(complete))
        return .continue
    }
}
