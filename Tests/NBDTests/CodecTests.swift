import DMIO
import NIOCore
import NIOEmbedded
@testable import NBD
import Testing

/// The wire decoders on their own, without a socket.
@Suite struct CodecTests {
    /// What a framer hands on, in order: it sits after the framer, as the
    /// transmission handler does, so that the pipeline holds it (the framer
    /// does not count its sink).
    private final class Framed: RequestSink, ChannelInboundHandler {
        typealias InboundIn = Never
        private var requests: [NBDRequest] = []
        func received(_ request: consuming NBDRequest) { requests.append(request) }
        func next() -> NBDRequest? { requests.isEmpty ? nil : requests.removeFirst() }
    }

    private func requestChannel(maxPayload: UInt32 = 1 << 20,
                                load: LoopLoad = LoopLoad(bufferLimit: 1 << 30)) -> (EmbeddedChannel, Framed) {
        let framer = RequestFramer(maxPayload: maxPayload, load: load)
        let framed = Framed()
        framer.sink = framed
        return (EmbeddedChannel(handlers: [framer, framed]), framed)
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
        let (channel, framed) = requestChannel()
        try channel.writeInbound(request(type: 0, flags: 4, length: 512))
        let decoded = try #require(framed.next())
        #expect(decoded == NBDRequest(flags: 4, type: 0, cookie: 7, offset: 4096, length: 512, payload: nil))
    }

    @Test(arguments: [1, 5, 27, 28, 97, 1028])
    func aWriteArrivingInPiecesIsDecodedOnceWhole(pieceBytes: Int) throws {
        let (channel, framed) = requestChannel()
        let data = (0..<1000).map { UInt8(truncatingIfNeeded: $0) }
        var input = request(type: 1, cookie: 1, length: 1000, payload: data)
        var next = request(type: 0, cookie: 2, length: 512)
        input.writeBuffer(&next)
        try feed(channel, input, pieceBytes: pieceBytes)
        let write = try #require(framed.next())
        #expect(write.cookie == 1 && write.length == 1000)
        #expect(bytes(of: write.payload) == data)
        #expect(framed.next()?.cookie == 2, "the request after it is framed too")
        #expect(framed.next() == nil)
    }

    /// A write's payload counts in the loop's room from its header on. With
    /// no room left, the payload begun is still framed to its end, and the
    /// requests after it wait, unframed and unread, until there is room.
    @Test func noRoomStopsFramingAfterThePayloadBegun() throws {
        let load = LoopLoad(bufferLimit: 1000)
        let (channel, framed) = requestChannel(load: load)
        let data = [UInt8](repeating: 5, count: 1000)
        var input = request(type: 1, cookie: 1, length: 1000, payload: data)
        var next = request(type: 0, cookie: 2, length: 512)
        input.writeBuffer(&next)
        try feed(channel, input, pieceBytes: 300)
        let write = try #require(framed.next())
        #expect(bytes(of: write.payload) == data)
        #expect(load.bufferedBytes == 1000)
        #expect(framed.next() == nil, "no room: the read is not framed")
        load.give(write.payloadBytes)
        channel.embeddedEventLoop.run()
        #expect(framed.next()?.cookie == 2)
    }

    @Test func anEmptyWriteHasAnEmptyPayload() throws {
        let (channel, framed) = requestChannel()
        try channel.writeInbound(request(type: 1, length: 0))
        let write = try #require(framed.next())
        #expect(bytes(of: write.payload) == [])
    }

    @Test func severalRequestsInOneReadAreAllDecoded() throws {
        let (channel, framed) = requestChannel()
        var batch = request(type: 0, cookie: 1, length: 512)
        var write = request(type: 1, cookie: 2, length: 3, payload: [1, 2, 3])
        var flush = request(type: 3, cookie: 3, offset: 0, length: 0)
        batch.writeBuffer(&write)
        batch.writeBuffer(&flush)
        try channel.writeInbound(batch)
        let cookies = try (0..<3).map { _ in try #require(framed.next()).cookie }
        #expect(cookies == [1, 2, 3])
    }

    @Test func aBadMagicEndsTheConnectionAndNothingAfterItIsFramed() throws {
        let (channel, framed) = requestChannel()
        #expect(throws: NBDProtocolError.badRequestMagic(0x1256_0953)) {
            try channel.writeInbound(request(type: 0, length: 512, magic: 0x1256_0953))
        }
        try channel.writeInbound(request(type: 0, length: 512))
        #expect(framed.next() == nil)
    }

    @Test func anOversizedWriteEndsTheConnectionBeforeItsDataArrives() throws {
        let (channel, _) = requestChannel(maxPayload: 4096)
        #expect(throws: NBDProtocolError.payloadTooLarge(1 << 30)) {
            try channel.writeInbound(request(type: 1, length: 1 << 30))
        }
    }

    @Test func optionsAreFramedAfterTheClientFlags() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(OptionDecoder()))
        var input = ByteBuffer()
        input.writeInteger(UInt32(3))
        input.writeOption(8)
        try channel.writeInbound(input)
        #expect(try channel.readInbound(as: HandshakeMessage.self) == .clientFlags(3))
        #expect(try channel.readInbound(as: HandshakeMessage.self) == .option(.structuredReply))
    }

    @Test func anOversizedOptionIsSkippedAndTheNextOneStillRead() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(OptionDecoder()))
        var input = ByteBuffer()
        input.writeInteger(UInt32(1))
        input.writeOptionHeader(9, length: UInt32(OptionDecoder.maxOptionData + 1))
        try channel.writeInbound(input)
        try channel.writeInbound(ByteBuffer(repeating: 0x41, count: OptionDecoder.maxOptionData + 1))
        var next = ByteBuffer()
        next.writeOption(2)
        try channel.writeInbound(next)
        #expect(try channel.readInbound(as: HandshakeMessage.self) == .clientFlags(1))
        #expect(try channel.readInbound(as: HandshakeMessage.self) == .option(.tooBig(code: 9)))
        #expect(try channel.readInbound(as: HandshakeMessage.self) == .option(.abort))
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

/// The typed option decoder: every option the server knows, well formed or
/// not, on its own.
@Suite struct OptionDecodingTests {
    private func decode(_ code: UInt32, _ data: [UInt8] = []) -> ClientOption {
        ClientOption(code: code, data: ByteBuffer(bytes: data))
    }

    @Test func optionsWithoutDataDecode() {
        #expect(decode(OptionCode.list.rawValue) == .list)
        #expect(decode(OptionCode.startTLS.rawValue) == .startTLS)
        #expect(decode(OptionCode.structuredReply.rawValue) == .structuredReply)
        #expect(decode(OptionCode.abort.rawValue) == .abort)
        // ABORT's data is to be ignored, not refused.
        #expect(decode(OptionCode.abort.rawValue, [1, 2]) == .abort)
    }

    @Test func optionsThatTakeNoDataAreMalformedWithIt() {
        #expect(decode(3, [1]) == .malformed(code: 3, why: "NBD_OPT_LIST takes no data"))
        #expect(decode(5, [0]) == .malformed(code: 5, why: "NBD_OPT_STARTTLS takes no data"))
        #expect(decode(8, [0]) == .malformed(code: 8, why: "NBD_OPT_STRUCTURED_REPLY takes no data"))
    }

    @Test func exportNameAndGoCarryTheName() {
        #expect(decode(1, Array("mem".utf8)) == .exportName("mem"))
        #expect(decode(1) == .exportName(""))
        #expect(decode(7, goData("mem", requests: [1, 3, 1])) == .go(.init(name: "mem", requests: [1, 3])))
        #expect(decode(6, goData("")) == .info(.init(name: "", requests: [])))
    }

    @Test(arguments: [
        [UInt8](),                            // no name length
        [0, 0, 0, 9, 0x61, 0, 0],             // a name longer than the data
        [0, 0, 0, 0],                         // no request count
        [0, 0, 0, 0, 0, 2, 0, 1],             // two requests, one there
        [0, 0, 0, 0, 0, 0, 7],                // a byte left over
    ])
    func malformedGoDataSaysSo(data: [UInt8]) {
        #expect(decode(7, data) == .malformed(code: 7, why: "malformed NBD_OPT_GO data"))
        #expect(decode(6, data) == .malformed(code: 6, why: "malformed NBD_OPT_INFO data"))
    }

    @Test func metaContextRequestsCarryTheExportAndQueries() {
        let data = metaContextData("mem", ["base:allocation", "dmio:"])
        let request = ClientOption.MetaContextRequest(export: "mem", queries: ["base:allocation", "dmio:"])
        #expect(decode(9, data) == .listMetaContext(request))
        #expect(decode(10, data) == .setMetaContext(request))
        #expect(decode(10, metaContextData("", [])) == .setMetaContext(.init(export: "", queries: [])))
    }

    @Test func malformedMetaContextRequestsSaySo() {
        var data = metaContextData("mem", ["base:allocation"])
        // The last query's length points past the data.
        data.removeLast()
        #expect(decode(10, data) == .malformed(code: 10, why: "malformed meta context request"))
        #expect(decode(9, metaContextData("mem", []) + [0]) == .malformed(code: 9, why: "malformed meta context request"))
    }

    @Test func unknownOptionsKeepTheirCode() {
        #expect(decode(99) == .unknown(code: 99))
        #expect(ClientOption.unknown(code: 99).code == 99)
        #expect(ClientOption.tooBig(code: 7).code == 7)
        #expect(ClientOption.go(.init(name: "", requests: [])).code == OptionCode.go.rawValue)
    }
}
