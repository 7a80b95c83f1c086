import DMIO
import NIOCore
import NIOEmbedded
@testable import NBD
import Testing

/// The wire decoders on their own, without a socket.
@Suite struct CodecTests {
    private func request(type: UInt16, flags: UInt16 = 0, cookie: UInt64 = 7, offset: UInt64 = 4096,
                         length: UInt32, payload: [UInt8] = [], magic: UInt32 = 0x2560_9513) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeInteger(magic)
        buffer.writeInteger(flags)
        buffer.writeInteger(type)
        buffer.writeInteger(cookie)
        buffer.writeInteger(offset)
        buffer.writeInteger(length)
        buffer.writeBytes(payload)
        return buffer
    }

    private func requestChannel(maxPayload: UInt32 = 1 << 20,
                                load: LoopLoad = LoopLoad(bufferLimit: 1 << 30)) -> EmbeddedChannel {
        EmbeddedChannel(handler: RequestFramer(maxPayload: maxPayload, load: load))
    }

    /// Feeds `input` to the channel in pieces of `pieceBytes`.
    private func feed(_ channel: EmbeddedChannel, _ input: ByteBuffer, pieceBytes: Int) throws {
        var input = input
        while input.readableBytes > 0 {
            try channel.writeInbound(input.readSlice(length: min(pieceBytes, input.readableBytes))!)
        }
    }

    private func bytes(of payload: WritePayload?) -> [UInt8]? {
        payload.map { payload in
            payload.withMemory { memory in
                [UInt8](unsafeUninitializedCapacity: payload.byteCount) { buffer, count in
                    memory.copy(to: UnsafeMutableRawBufferPointer(buffer))
                    count = payload.byteCount
                }
            }
        }
    }

    @Test func aReadRequestIsDecoded() throws {
        let channel = requestChannel()
        try channel.writeInbound(request(type: 0, flags: 4, length: 512))
        let decoded = try #require(try channel.readInbound(as: NBDRequest.self))
        #expect(decoded == NBDRequest(flags: 4, type: 0, cookie: 7, offset: 4096, length: 512, payload: nil))
    }

    @Test(arguments: [1, 5, 27, 28, 97, 1028])
    func aWriteArrivingInPiecesIsDecodedOnceWhole(pieceBytes: Int) throws {
        let channel = requestChannel()
        let data = (0..<1000).map { UInt8(truncatingIfNeeded: $0) }
        var input = request(type: 1, cookie: 1, length: 1000, payload: data)
        var next = request(type: 0, cookie: 2, length: 512)
        input.writeBuffer(&next)
        try feed(channel, input, pieceBytes: pieceBytes)
        let write = try #require(try channel.readInbound(as: NBDRequest.self))
        #expect(write.cookie == 1 && write.length == 1000)
        #expect(bytes(of: write.payload) == data)
        #expect(try channel.readInbound(as: NBDRequest.self)?.cookie == 2, "the request after it is framed too")
        #expect(try channel.readInbound(as: NBDRequest.self) == nil)
    }

    /// A write's payload counts in the loop's room from its header on. With
    /// no room left, the payload begun is still framed to its end, and the
    /// requests after it wait, unframed and unread, until there is room.
    @Test func noRoomStopsFramingAfterThePayloadBegun() throws {
        let load = LoopLoad(bufferLimit: 1000)
        let channel = requestChannel(load: load)
        let data = [UInt8](repeating: 5, count: 1000)
        var input = request(type: 1, cookie: 1, length: 1000, payload: data)
        var next = request(type: 0, cookie: 2, length: 512)
        input.writeBuffer(&next)
        try feed(channel, input, pieceBytes: 300)
        let write = try #require(try channel.readInbound(as: NBDRequest.self))
        #expect(bytes(of: write.payload) == data)
        #expect(load.bufferedBytes == 1000)
        #expect(try channel.readInbound(as: NBDRequest.self) == nil, "no room: the read is not framed")
        load.give(write.payloadBytes)
        channel.embeddedEventLoop.run()
        #expect(try channel.readInbound(as: NBDRequest.self)?.cookie == 2)
    }

    @Test func anEmptyWriteHasAnEmptyPayload() throws {
        let channel = requestChannel()
        try channel.writeInbound(request(type: 1, length: 0))
        let write = try #require(try channel.readInbound(as: NBDRequest.self))
        #expect(bytes(of: write.payload) == [])
    }

    @Test func severalRequestsInOneReadAreAllDecoded() throws {
        let channel = requestChannel()
        var batch = request(type: 0, cookie: 1, length: 512)
        var write = request(type: 1, cookie: 2, length: 3, payload: [1, 2, 3])
        var flush = request(type: 3, cookie: 3, offset: 0, length: 0)
        batch.writeBuffer(&write)
        batch.writeBuffer(&flush)
        try channel.writeInbound(batch)
        let cookies = try (0..<3).map { _ in try #require(try channel.readInbound(as: NBDRequest.self)).cookie }
        #expect(cookies == [1, 2, 3])
    }

    @Test func aBadMagicEndsTheConnectionAndNothingAfterItIsFramed() throws {
        let channel = requestChannel()
        #expect(throws: NBDProtocolError.badRequestMagic(0x1256_0953)) {
            try channel.writeInbound(request(type: 0, length: 512, magic: 0x1256_0953))
        }
        try channel.writeInbound(request(type: 0, length: 512))
        #expect(try channel.readInbound(as: NBDRequest.self) == nil)
    }

    @Test func anOversizedWriteEndsTheConnectionBeforeItsDataArrives() throws {
        let channel = requestChannel(maxPayload: 4096)
        #expect(throws: NBDProtocolError.payloadTooLarge(1 << 30)) {
            try channel.writeInbound(request(type: 1, length: 1 << 30))
        }
    }

    @Test func optionsAreFramedAfterTheClientFlags() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(OptionDecoder()))
        var input = ByteBuffer()
        input.writeInteger(UInt32(3))
        input.writeInteger(Magic.option)
        input.writeInteger(UInt32(8))
        input.writeInteger(UInt32(0))
        try channel.writeInbound(input)
        #expect(try channel.readInbound(as: HandshakeMessage.self) == .clientFlags(3))
        #expect(try channel.readInbound(as: HandshakeMessage.self) == .option(code: 8, data: ByteBuffer()))
    }

    @Test func anOversizedOptionIsSkippedAndTheNextOneStillRead() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(OptionDecoder()))
        var input = ByteBuffer()
        input.writeInteger(UInt32(1))
        input.writeInteger(Magic.option)
        input.writeInteger(UInt32(9))
        input.writeInteger(UInt32(OptionDecoder.maxOptionData + 1))
        try channel.writeInbound(input)
        try channel.writeInbound(ByteBuffer(repeating: 0x41, count: OptionDecoder.maxOptionData + 1))
        var next = ByteBuffer()
        next.writeInteger(Magic.option)
        next.writeInteger(UInt32(2))
        next.writeInteger(UInt32(0))
        try channel.writeInbound(next)
        #expect(try channel.readInbound(as: HandshakeMessage.self) == .clientFlags(1))
        #expect(try channel.readInbound(as: HandshakeMessage.self) == .oversizedOption(code: 9))
        #expect(try channel.readInbound(as: HandshakeMessage.self) == .option(code: 2, data: ByteBuffer()))
    }

    @Test func aBadOptionMagicEndsTheConnection() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(OptionDecoder()))
        var input = ByteBuffer()
        input.writeInteger(UInt32(1))
        input.writeInteger(UInt64(0xDEAD_BEEF))
        input.writeInteger(UInt64(0))
        #expect(throws: NBDProtocolError.badOptionMagic(0xDEAD_BEEF)) { try channel.writeInbound(input) }
    }

    @Test func protocolStringsAreCutAtACharacterBoundary() {
        let long = String(repeating: "é", count: 3000)   // 6000 bytes
        let cut = protocolString("no export named \"" + long)
        #expect(cut.count <= WireSize.maxString)
        #expect(String(validating: cut, as: UTF8.self) != nil, "still valid UTF-8")
    }
}
