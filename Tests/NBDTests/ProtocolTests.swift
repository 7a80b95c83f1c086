import BlockTargets
import Glibc
import Logging
import NIOCore
import NIOEmbedded
@testable import NBD
import TestSupport
import Testing

/// The handshake and the transmission phase on an EmbeddedChannel: every
/// malformed or hostile input gets the reply, or the disconnect, that the
/// spec names, and nothing outside the export is touched.
@Suite struct ProtocolTests {
    let target = MemoryTarget(size: 1 << 20)

    /// A connection through the server's own pipeline, after its greeting.
    private func connection(readOnly: Bool = false, load: LoopLoad = LoopLoad(bufferLimit: 1 << 30)) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        try NBDServer.configure(channel, exports: [Export(name: "mem", readOnly: readOnly, target: target)], load: load,
                                logger: logger)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 10809)).wait()
        var greeting = try #require(try channel.readOutbound(as: ByteBuffer.self))
        #expect(greeting.readInteger(as: UInt64.self) == Magic.greeting)
        #expect(greeting.readInteger(as: UInt64.self) == Magic.option)
        #expect(greeting.readInteger(as: UInt16.self) == 3)
        return channel
    }

    private func send(_ channel: EmbeddedChannel, _ build: (inout ByteBuffer) -> Void) throws {
        var buffer = ByteBuffer()
        build(&buffer)
        try channel.writeInbound(buffer)
        channel.embeddedEventLoop.run()
    }

    private func option(_ code: UInt32, _ data: [UInt8] = []) -> (inout ByteBuffer) -> Void {
        { $0.writeOption(code, data) }
    }

    /// Every option reply the server sent: (option, type, data).
    private func optionReplies(_ channel: EmbeddedChannel) throws -> [(UInt32, UInt32, ByteBuffer)] {
        var replies: [(UInt32, UInt32, ByteBuffer)] = []
        while var buffer = try channel.readOutbound(as: ByteBuffer.self) {
            while buffer.readableBytes > 0 {
                #expect(buffer.readInteger(as: UInt64.self) == Magic.optionReply)
                let option = buffer.readInteger(as: UInt32.self)!
                let type = buffer.readInteger(as: UInt32.self)!
                let length = buffer.readInteger(as: UInt32.self)!
                replies.append((option, type, buffer.readSlice(length: Int(length))!))
            }
        }
        return replies
    }

    @Test func unknownClientFlagsCloseTheConnection() throws {
        let channel = try connection()
        try send(channel) { $0.writeInteger(UInt32(0x80)) }
        #expect(!channel.isActive)
    }

    @Test func unknownAndMalformedOptionsGetErrorReplies() throws {
        let channel = try connection()
        try send(channel) { $0.writeInteger(UInt32(1)) }
        try send(channel, option(99))
        try send(channel, option(3, [1]))                 // LIST with data
        try send(channel, option(5))                      // STARTTLS
        try send(channel, option(7, [0, 0, 0, 9, 1]))     // GO whose name runs past the data
        try send(channel, option(7, goData("nope")))      // GO to an unknown export
        try send(channel, option(10, goData("mem")))      // SET_META_CONTEXT before structured replies
        try send(channel, option(8, [0]))                 // STRUCTURED_REPLY with data
        let types = try optionReplies(channel).map { ($0.0, $0.1) }
        #expect(types.map(\.0) == [99, 3, 5, 7, 7, 10, 8])
        #expect(types.map(\.1) == [OptionReply.errUnsupported, .errInvalid, .errPolicy, .errInvalid, .errUnknown,
                                   .errInvalid, .errInvalid].map(\.rawValue))
        #expect(channel.isActive, "errors during the handshake do not end it")
    }

    @Test func aClientThatDoesNotFinishItsHandshakeIsDropped() throws {
        let idle = try connection()
        try send(idle) { $0.writeInteger(UInt32(1)) }
        idle.embeddedEventLoop.advanceTime(by: HandshakeHandler.timeLimit - .seconds(1))
        #expect(idle.isActive)
        idle.embeddedEventLoop.advanceTime(by: .seconds(1))
        #expect(!idle.isActive)

        // Once in the transmission phase, a quiet client stays.
        let served = try transmission(structured: true)
        served.embeddedEventLoop.advanceTime(by: HandshakeHandler.timeLimit * 2)
        #expect(served.isActive)
    }

    @Test func exportNameToAnUnknownExportDropsTheConnection() throws {
        let channel = try connection()
        try send(channel) { $0.writeInteger(UInt32(1)) }
        try send(channel, option(1, Array("nope".utf8)))
        #expect(!channel.isActive)
    }

    /// Bytes sent with the option that ends the handshake, in one packet,
    /// are transmission-phase bytes: a request there is served, also when
    /// the client's input ends right after it (a half-close); options there
    /// make a bad request header, which closes the connection (and only it).
    @Test(arguments: [false, true])
    func bytesSentWithGOAreReadAsRequests(inputEnds: Bool) throws {
        let channel = try connection()
        target.bytes[0..<512] = ArraySlice(repeating: 0x5A, count: 512)
        var packet = ByteBuffer()
        packet.writeInteger(UInt32(1))
        option(7, goData("mem"))(&packet)
        packet.writeRequest(type: 0, cookie: 9, offset: 0, length: 512)
        try channel.writeInbound(packet)
        if inputEnds { channel.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
        channel.embeddedEventLoop.run()
        var reply = ByteBuffer()
        while var buffer = try channel.readOutbound(as: ByteBuffer.self) { reply.writeBuffer(&buffer) }
        // GO's replies, up to its ACK, then the read's.
        var optionReply: UInt32?
        while optionReply != OptionReply.ack.rawValue {
            #expect(reply.readInteger(as: UInt64.self) == Magic.optionReply)
            _ = reply.readInteger(as: UInt32.self)
            optionReply = reply.readInteger(as: UInt32.self)
            let length = reply.readInteger(as: UInt32.self)
            reply.moveReaderIndex(forwardBy: Int(try #require(length)))
        }
        #expect(reply.readInteger(as: UInt32.self) == Magic.simpleReply)
        #expect(reply.readInteger(as: UInt32.self) == 0)
        #expect(reply.readInteger(as: UInt64.self) == 9)
        #expect(reply.readBytes(length: 512) == [UInt8](repeating: 0x5A, count: 512))
        #expect(target.openBatches == 0, "the request's batch ended: a real target holds its I/O until then")
        #expect(channel.isActive != inputEnds, "a half-closed connection closes once it has answered")
    }

    /// A client whose input has ended and that takes no replies is let go
    /// after a while, not kept with its replies for ever.
    @Test func aHalfClosedClientThatTakesNoRepliesIsLetGo() throws {
        let channel = try transmission(structured: true)
        channel.isWritable = false
        channel.pipeline.fireChannelWritabilityChanged()
        for cookie in 0..<UInt64(3) {
            try sendRequest(channel, type: 0, cookie: cookie, offset: 0, length: 512)
        }
        channel.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        channel.embeddedEventLoop.advanceTime(by: TransmissionHandler.closeGrace - .seconds(1))
        #expect(channel.isActive)
        channel.embeddedEventLoop.advanceTime(by: TransmissionHandler.closeGrace)
        #expect(!channel.isActive)
    }

    /// A closed connection's handler goes, with its buffers: nothing keeps
    /// it (it once kept itself, through its event-loop-bound reference).
    @Test func aClosedConnectionsHandlerIsFreed() throws {
        weak var handler: TransmissionHandler?
        do {
            let channel = try transmission(structured: true)
            try sendRequest(channel, type: 0, cookie: 1, offset: 0, length: 4096)
            handler = try channel.pipeline.syncOperations.handler(type: TransmissionHandler.self)
            _ = try channel.finish(acceptAlreadyClosed: true)
        }
        #expect(handler == nil)
    }

    @Test(arguments: ["GO, STRUCTURED_REPLY", "GO, an oversized option", "EXPORT_NAME, LIST"])
    func optionsSentAfterTheHandshakeEndsCloseOnlyThatConnection(sequence: String) throws {
        let channel = try connection()
        try send(channel) { buffer in
            buffer.writeInteger(UInt32(1))
            switch sequence {
            case "GO, STRUCTURED_REPLY":
                option(7, goData("mem"))(&buffer)
                option(8)(&buffer)
                option(8)(&buffer)
            case "GO, an oversized option":
                option(7, goData("mem"))(&buffer)
                buffer.writeOptionHeader(7, length: UInt32(OptionDecoder.maxOptionData + 1))
                buffer.writeBytes([UInt8](repeating: 0, count: 64))
            default:
                option(1, Array("mem".utf8))(&buffer)
                option(3)(&buffer)
                option(3)(&buffer)
            }
        }
        channel.embeddedEventLoop.run()
        #expect(!channel.isActive)
    }

    /// A transmission-phase connection, after NBD_OPT_GO.
    private func transmission(structured: Bool, readOnly: Bool = false,
                              load: LoopLoad = LoopLoad(bufferLimit: 1 << 30)) throws -> EmbeddedChannel {
        let channel = try connection(readOnly: readOnly, load: load)
        try send(channel) { $0.writeInteger(UInt32(1)) }
        if structured { try send(channel, option(8)) }
        try send(channel, option(7, goData("mem")))
        let replies = try optionReplies(channel)
        #expect(replies.last?.1 == OptionReply.ack.rawValue)
        return channel
    }

    private func sendRequest(_ channel: EmbeddedChannel, type: UInt16, flags: UInt16 = 0, cookie: UInt64,
                             offset: UInt64, length: UInt32, payload: [UInt8] = []) throws {
        try send(channel) {
            $0.writeRequest(type: type, flags: flags, cookie: cookie, offset: offset, length: length, payload: payload)
        }
    }

    /// (cookie, error, data) of each reply. Simple replies are taken to carry
    /// no data (errors, and commands other than reads): a simple read reply
    /// cannot be framed without knowing its request.
    private func replies(_ channel: EmbeddedChannel) throws -> [(cookie: UInt64, error: UInt32, data: [UInt8])] {
        var all: [(UInt64, UInt32, [UInt8])] = []
        while var buffer = try channel.readOutbound(as: ByteBuffer.self) {
            while buffer.readableBytes > 0 {
                let magic = buffer.readInteger(as: UInt32.self)!
                if magic == Magic.simpleReply {
                    let error = buffer.readInteger(as: UInt32.self)!
                    all.append((buffer.readInteger(as: UInt64.self)!, error, []))
                } else {
                    #expect(magic == Magic.structuredReply)
                    _ = buffer.readInteger(as: UInt16.self)
                    let type = buffer.readInteger(as: UInt16.self)!
                    let cookie = buffer.readInteger(as: UInt64.self)!
                    var payload = buffer.readSlice(length: Int(buffer.readInteger(as: UInt32.self)!))!
                    if type == ChunkType.error.rawValue {
                        all.append((cookie, payload.readInteger(as: UInt32.self)!, []))
                    } else if type == ChunkType.offsetData.rawValue {
                        _ = payload.readInteger(as: UInt64.self)
                        all.append((cookie, 0, Array(payload.readableBytesView)))
                    } else {
                        all.append((cookie, 0, []))
                    }
                }
            }
        }
        return all
    }

    @Test(arguments: [true, false])
    func hostileRequestsGetTheSpecsErrorsAndTouchNothing(structured: Bool) throws {
        let channel = try transmission(structured: structured)
        try sendRequest(channel, type: 42, cookie: 1, offset: 0, length: 512)                 // unknown command
        try sendRequest(channel, type: 0, flags: 0x40, cookie: 2, offset: 0, length: 512)     // unknown flag
        try sendRequest(channel, type: 0, flags: 2, cookie: 3, offset: 0, length: 512)        // NO_HOLE on a read
        try sendRequest(channel, type: 0, cookie: 4, offset: 1 << 20, length: 512)            // past the end
        try sendRequest(channel, type: 1, cookie: 5, offset: (1 << 20) - 512, length: 1024,
                        payload: [UInt8](repeating: 0xFF, count: 1024))                      // write past the end
        try sendRequest(channel, type: 0, cookie: 6, offset: 100, length: 512)                // unaligned
        try sendRequest(channel, type: 0, cookie: 7, offset: 0, length: 2 << 20)              // over the payload limit
        try sendRequest(channel, type: 7, cookie: 8, offset: 0, length: 512)                  // block status, no context
        let got = try replies(channel)
        #expect(got.map(\.cookie) == [1, 2, 3, 4, 5, 6, 7, 8])
        let einval = NBDErrorCode.invalid.rawValue
        #expect(got.map(\.error) == [einval, einval, einval, einval, NBDErrorCode.noSpace.rawValue, einval, einval, einval])
        #expect(target.bytes.allSatisfy { $0 == 0 }, "nothing was written")
        #expect(channel.isActive)
    }

    @Test func writesToAReadOnlyExportGetEPERM() throws {
        let channel = try transmission(structured: true, readOnly: true)
        try sendRequest(channel, type: 1, cookie: 1, offset: 0, length: 512, payload: [UInt8](repeating: 1, count: 512))
        try sendRequest(channel, type: 6, cookie: 2, offset: 0, length: 512)
        #expect(try replies(channel).map(\.error) == [NBDErrorCode.perm.rawValue, NBDErrorCode.perm.rawValue])
    }

    @Test func aTargetErrorBecomesTheNBDError() throws {
        let channel = try transmission(structured: true)
        target.failNext = 28  // ENOSPC
        try sendRequest(channel, type: 1, cookie: 9, offset: 0, length: 512, payload: [UInt8](repeating: 1, count: 512))
        #expect(try replies(channel).map(\.error) == [NBDErrorCode.noSpace.rawValue])
    }

    /// ENOTSUP is only for FAST_ZERO requests and EOVERFLOW only for DF
    /// reads (the spec, and nbdkit): elsewhere their causes are EINVAL.
    @Test(arguments: [(errno: EOPNOTSUPP, type: UInt16(4)), (errno: EOVERFLOW, type: UInt16(0)),
                      (errno: EOPNOTSUPP, type: UInt16(6))])
    func errorsOnlyCertainRequestsMayGetAreInvalidElsewhere(errno: Int32, type: UInt16) throws {
        let channel = try transmission(structured: true)
        target.failNext = errno
        try sendRequest(channel, type: type, cookie: 4, offset: 0, length: 512)
        #expect(try replies(channel).map(\.error) == [NBDErrorCode.invalid.rawValue])
    }

    @Test func theRequestsThatAskForThemGetENOTSUPAndEOVERFLOW() {
        let unsupported = TargetResult(errno: EOPNOTSUPP, message: "no")
        let overflow = TargetResult(errno: EOVERFLOW, message: "no")
        #expect(nbdError(for: unsupported, flags: .fastZero).error == .notSupported)
        #expect(nbdError(for: overflow, flags: .dontFragment).error == .overflow)
        #expect(nbdError(for: overflow, flags: .fastZero).error == .invalid)
        #expect(nbdError(for: TargetResult(errno: EIO), flags: []).message == String(cString: strerror(EIO)))
    }

    @Test func aClientThatVanishesMidWriteHarmsNothing() throws {
        let channel = try transmission(structured: true)
        // The header, and a payload that ends early.
        try sendRequest(channel, type: 1, cookie: 1, offset: 0, length: 4096,
                        payload: [UInt8](repeating: 0xAB, count: 1000))
        try channel.close().wait()
        #expect(target.bytes.allSatisfy { $0 == 0 }, "a partial write is never applied")
    }

    @Test func disconnectClosesAfterTheRepliesInFlight() throws {
        let channel = try transmission(structured: false)
        let data = [UInt8](repeating: 7, count: 512)
        try sendRequest(channel, type: 1, cookie: 1, offset: 512, length: 512, payload: data)
        try sendRequest(channel, type: 2, cookie: 2, offset: 0, length: 0)
        try sendRequest(channel, type: 0, cookie: 3, offset: 512, length: 512)  // after DISC: ignored
        #expect(try replies(channel).map(\.cookie) == [1])
        #expect(!channel.isActive)
        #expect(Array(target.bytes[512..<1024]) == data)
    }

    @Test func aSlowRequestDoesNotHoldBackTheOthers() throws {
        let channel = try transmission(structured: true)
        target.bytes.replaceSubrange(4096..<4608, with: repeatElement(9, count: 512))
        target.holdReadsAt = 0
        try sendRequest(channel, type: 0, cookie: 1, offset: 0, length: 512)     // held by the target
        try sendRequest(channel, type: 0, cookie: 2, offset: 4096, length: 512)
        try sendRequest(channel, type: 3, cookie: 3, offset: 0, length: 0)
        #expect(try replies(channel).map(\.cookie) == [2, 3], "later requests are answered first")
        target.held.removeFirst()()
        channel.embeddedEventLoop.run()
        let late = try replies(channel)
        #expect(late.map(\.cookie) == [1])
        #expect(late.first?.data == [UInt8](repeating: 0, count: 512))
    }

    /// Counts the socket reads the handlers above it ask for.
    private final class ReadCounter: ChannelOutboundHandler {
        typealias OutboundIn = Any
        var reads = 0
        func read(context: ChannelHandlerContext) {
            reads += 1
            context.read()
        }
    }

    /// One socket read can hold far more requests than the limits allow:
    /// the rest wait, unstarted (a read's reply buffer is not allocated),
    /// and start in order as replies make room.
    @Test(arguments: [(count: 300, length: UInt32(512), started: TransmissionHandler.maxRequestsInFlight),
                      (count: 100, length: UInt32(1 << 20), started: TransmissionHandler.maxBytesInFlight >> 20)])
    func requestsBeyondTheLimitsInOneReadWaitTheirTurn(count: Int, length: UInt32, started: Int) throws {
        let channel = try transmission(structured: true)
        target.holdAllReads = true
        try send(channel) { buffer in
            for cookie in 0..<UInt64(count) {
                buffer.writeRequest(type: 0, cookie: cookie, offset: 0, length: length)
            }
        }
        #expect(target.held.count == started)
        var answered: [UInt64] = []
        while answered.count < count {
            let held = target.held
            target.held.removeAll()
            target.holdAllReads = true
            for release in held { release() }
            channel.embeddedEventLoop.run()
            let got = try replies(channel)
            #expect(!got.isEmpty, "each round of replies starts more of the waiting requests")
            if got.isEmpty { break }
            answered += got.map(\.cookie)
        }
        #expect(answered == Array(0..<UInt64(count)))
    }

    /// A client that takes no replies (the channel is not writable) gets
    /// no more requests started, so their replies cannot pile up.
    @Test func requestsWaitWhileTheClientTakesNoReplies() throws {
        let channel = try transmission(structured: true)
        channel.isWritable = false
        channel.pipeline.fireChannelWritabilityChanged()
        for cookie in 0..<UInt64(10) {
            try sendRequest(channel, type: 0, cookie: cookie, offset: 0, length: 512)
        }
        #expect(try replies(channel).isEmpty)
        channel.isWritable = true
        channel.pipeline.fireChannelWritabilityChanged()
        channel.embeddedEventLoop.run()
        #expect(try replies(channel).map(\.cookie) == Array(0..<10))
    }

    @Test func aFullQueueStopsReadingFromTheClientUntilRepliesGoOut() throws {
        // Structured replies, which say their own length, so they can be counted.
        let channel = try transmission(structured: true)
        let counter = ReadCounter()
        try channel.pipeline.syncOperations.addHandler(counter, position: .first)
        target.holdAllReads = true
        try send(channel) { buffer in
            for cookie in 0..<UInt64(TransmissionHandler.maxRequestsInFlight) {
                buffer.writeRequest(type: 0, cookie: cookie, offset: 0, length: UInt32(512))
            }
        }
        #expect(target.held.count == TransmissionHandler.maxRequestsInFlight)
        channel.read()
        #expect(counter.reads == 0, "no more requests are read while the queue is full")
        for release in target.held { release() }
        target.held.removeAll()
        channel.embeddedEventLoop.run()
        #expect(counter.reads == 1, "the held read goes on once replies went out")
        #expect(try replies(channel).count == TransmissionHandler.maxRequestsInFlight)
    }

    /// Requests read while the loop had room, which then went (to other
    /// connections): a read waits for room, and so does what follows it,
    /// but writes (their payloads are held already); NBD_CMD_DISC stays
    /// last. Every byte is given back.
    @Test func readsWaitForTheLoopsRoomAndWritesGoPast() throws {
        let load = LoopLoad(bufferLimit: 1 << 20)
        let channel = try transmission(structured: true, load: load)
        channel.isWritable = false
        channel.pipeline.fireChannelWritabilityChanged()
        try sendRequest(channel, type: 0, cookie: 2, offset: 0, length: 4096)
        try sendRequest(channel, type: 3, cookie: 3, offset: 0, length: 0)
        try sendRequest(channel, type: 1, cookie: 4, offset: 8192, length: 4096, payload: pattern(4096, seed: 9))
        try sendRequest(channel, type: 2, cookie: 5, offset: 0, length: 0)
        try sendRequest(channel, type: 1, cookie: 6, offset: 0, length: 4096, payload: pattern(4096, seed: 10))
        let otherConnections = 2 << 20
        load.take(otherConnections)
        setWritable(channel, true)
        #expect(try replies(channel).map(\.cookie) == [4], "only the write went past the read")
        #expect(Array(target.bytes[8192..<12288]) == pattern(4096, seed: 9))

        load.give(otherConnections)
        channel.embeddedEventLoop.run()
        #expect(try replies(channel).map(\.cookie).sorted() == [2, 3])
        #expect(!channel.isActive, "NBD_CMD_DISC ran last")
        #expect(target.bytes[0..<4096].allSatisfy { $0 == 0 }, "nothing after NBD_CMD_DISC runs")
        #expect(load.bufferedBytes == 0)
        #expect(load.requestsInFlight == 0)
    }

    /// A read set aside for room that then cannot start for the client's
    /// sake (it takes no replies) waits for the client, without spinning
    /// the loop once the room is back.
    @Test func setAsideReadsWaitForTheClientWithoutSpinning() throws {
        let load = LoopLoad(bufferLimit: 1 << 20)
        let channel = try transmission(structured: true, load: load)
        channel.isWritable = false
        channel.pipeline.fireChannelWritabilityChanged()
        try sendRequest(channel, type: 0, cookie: 1, offset: 0, length: 4096)
        let otherConnections = 2 << 20
        load.take(otherConnections)
        setWritable(channel, true)
        channel.isWritable = false
        channel.pipeline.fireChannelWritabilityChanged()
        load.give(otherConnections)
        channel.embeddedEventLoop.run()
        #expect(try replies(channel).isEmpty)
        setWritable(channel, true)
        #expect(try replies(channel).map(\.cookie) == [1])
    }

    /// Room comes back and the framing of what waited begins a write's
    /// payload, over the loop's share again: the rest of the payload is
    /// still read, and then everything runs.
    @Test func aPayloadBegunWhenRoomCameBackIsReadToItsEnd() throws {
        let load = LoopLoad(bufferLimit: 4096)
        let channel = try transmission(structured: true, load: load)
        let counter = ReadCounter()
        try channel.pipeline.syncOperations.addHandler(counter, position: .first)
        channel.isWritable = false
        channel.pipeline.fireChannelWritabilityChanged()
        try sendRequest(channel, type: 0, cookie: 1, offset: 0, length: 4096)
        let otherConnections = 1 << 20
        load.take(otherConnections)
        setWritable(channel, true)
        let data = pattern(8192, seed: 3)
        try sendRequest(channel, type: 1, cookie: 2, offset: 8192, length: 8192, payload: Array(data[0..<1000]))
        let readsBefore = counter.reads
        load.give(otherConnections)
        channel.embeddedEventLoop.run()
        #expect(counter.reads > readsBefore, "the rest of the payload is asked for")
        try send(channel) { $0.writeBytes(data[1000...]) }
        channel.embeddedEventLoop.run()
        #expect(try replies(channel).map(\.cookie).sorted() == [1, 2])
        #expect(Array(target.bytes[8192..<16384]) == data)
        #expect(load.bufferedBytes == 0)
    }

    /// Requests that wait unframed for room when the client half-closes
    /// are answered all the same, and the connection closes after.
    @Test func requestsWaitingForRoomAreAnsweredAfterTheClientHalfCloses() throws {
        let load = LoopLoad(bufferLimit: 4096)
        let channel = try transmission(structured: true, load: load)
        let otherConnections = 1 << 20
        load.take(otherConnections)
        try sendRequest(channel, type: 0, cookie: 1, offset: 0, length: 4096)
        channel.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        channel.embeddedEventLoop.run()
        #expect(channel.isActive, "a request waits to be answered")
        load.give(otherConnections)
        channel.embeddedEventLoop.run()
        #expect(try replies(channel).map(\.cookie) == [1])
        #expect(!channel.isActive)
    }

    private func setWritable(_ channel: EmbeddedChannel, _ writable: Bool) {
        channel.isWritable = writable
        channel.pipeline.fireChannelWritabilityChanged()
        channel.embeddedEventLoop.run()
    }
}
