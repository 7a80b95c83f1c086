import NIOCore

/// What the client sends during the handshake.
enum HandshakeMessage: Equatable {
    /// The client's 32-bit flags, right after the server's greeting.
    case clientFlags(UInt32)
    /// One option, decoded (an option whose data is longer than any this
    /// server accepts is `tooBig`: its data is skipped, so the handshake
    /// can go on).
    case option(ClientOption)
}

/// Frames the handshake: the client flags, then options (IHAVEOPT, code,
/// length, data). A wrong option magic is a protocol violation: the
/// decoder throws and the connection is closed.
struct OptionDecoder: ByteToMessageDecoder {
    typealias InboundOut = HandshakeMessage

    /// Longer option data is skipped and answered NBD_REP_ERR_TOO_BIG.
    static let maxOptionData = 64 * 1024

    /// Where the bytes after the option just decoded go, set by the
    /// handshake handler as it takes the option.
    final class Handover {
        enum Next {
            /// More options.
            case options
            /// TLS starts: the bytes the decoder holds came before the
            /// client saw the acknowledgement of NBD_OPT_STARTTLS, so not
            /// through TLS; they are dropped (nbdkit's CVE-2021-3716), and
            /// the options that come decrypted are read as usual.
            case tls
            /// The handshake is over: what the decoder holds belongs to the
            /// transmission phase.
            case transmission
        }
        var next = Next.options
    }

    private let handover: Handover
    private var sawClientFlags = false
    private var bytesToSkip = 0

    init(handover: Handover = Handover()) {
        self.handover = handover
    }

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        if bytesToSkip > 0 {
            let skipped = min(bytesToSkip, buffer.readableBytes)
            buffer.moveReaderIndex(forwardBy: skipped)
            bytesToSkip -= skipped
            return bytesToSkip == 0 ? .continue : .needMoreData
        }
        guard sawClientFlags else {
            guard let flags = buffer.readInteger(as: UInt32.self) else { return .needMoreData }
            sawClientFlags = true
            context.fireChannelRead(wrapInboundOut(.clientFlags(flags)))
            return .continue
        }
        guard let (magic, code, length) = buffer.getOptionHeader() else { return .needMoreData }
        guard magic == Magic.option else { throw NBDProtocolError.badOptionMagic(magic) }
        if length > Self.maxOptionData {
            buffer.moveReaderIndex(forwardBy: WireSize.optionHeader)
            bytesToSkip = Int(length)
            context.fireChannelRead(wrapInboundOut(.option(.tooBig(code: code))))
            return .continue
        }
        guard buffer.readableBytes >= WireSize.optionHeader + Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: WireSize.optionHeader)
        let data = buffer.readSlice(length: Int(length))!
        context.fireChannelRead(wrapInboundOut(.option(ClientOption(code: code, data: data))))
        if handover.next == .tls {
            handover.next = .options
            buffer.moveReaderIndex(to: buffer.writerIndex)
            return .needMoreData
        }
        return .continue
    }

    /// Runs when the handshake is over (the decoder leaves the pipeline) or
    /// the client's input ends. Bytes that came after the option that ended
    /// the handshake belong to the transmission phase: they go on as they
    /// are, to the request framer, and are never read as options (even when
    /// the input ends in the same read: they are requests to answer). Bytes
    /// left at the end of an unfinished handshake are dropped: the handshake
    /// handler takes only options.
    mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer,
                             seenEOF: Bool) throws -> DecodingState {
        if handover.next == .transmission && buffer.readableBytes > 0 {
            context.fireChannelRead(NIOAny(buffer.readSlice(length: buffer.readableBytes)!))
            // As a socket read does: the transmission handler ends the batch
            // of requests there (it holds their I/O until then) and replies.
            context.fireChannelReadComplete()
        }
        buffer.moveReaderIndex(to: buffer.writerIndex)
        return .needMoreData
    }
}

extension ByteBuffer {
    fileprivate func getOptionHeader() -> (UInt64, UInt32, UInt32)? {
        guard let magic = getInteger(at: readerIndex, as: UInt64.self),
              let code = getInteger(at: readerIndex + 8, as: UInt32.self),
              let length = getInteger(at: readerIndex + 12, as: UInt32.self) else { return nil }
        return (magic, code, length)
    }
}

/// A client broke the protocol in a way that ends the connection.
enum NBDProtocolError: Error, Equatable, CustomStringConvertible {
    case badOptionMagic(UInt64)
    case badRequestMagic(UInt32)
    case unknownClientFlags(UInt32)
    case payloadTooLarge(UInt32)

    var description: String {
        switch self {
        case .badOptionMagic(let magic): "bad option magic 0x\(String(magic, radix: 16))"
        case .badRequestMagic(let magic): "bad request magic 0x\(String(magic, radix: 16))"
        case .unknownClientFlags(let flags): "unknown client flags 0x\(String(flags, radix: 16))"
        case .payloadTooLarge(let length): "write payload of \(length) bytes is over the limit"
        }
    }
}
