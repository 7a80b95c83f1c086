import BlockTargets
import NIOCore

// The server's messages, written straight into a ByteBuffer so that the
// replies of one batch share one buffer and one write.

extension ByteBuffer {
    mutating func writeGreeting() {
        writeInteger(Magic.greeting)
        writeInteger(Magic.option)
        writeInteger(HandshakeFlag.fixedNewstyle | HandshakeFlag.noZeroes)
    }

    /// An option reply with `data` as its payload.
    mutating func writeOptionReply(_ option: UInt32, _ type: OptionReply, data: ByteBuffer? = nil) {
        writeInteger(Magic.optionReply)
        writeInteger(option)
        writeInteger(type.rawValue)
        writeInteger(UInt32(data?.readableBytes ?? 0))
        if let data { writeImmutableBuffer(data) }
    }

    /// An error option reply with a message for the person at the client.
    mutating func writeOptionError(_ option: UInt32, _ type: OptionReply, message: String) {
        writeOptionReply(option, type, data: ByteBuffer(bytes: protocolString(message)))
    }

    /// NBD_REP_SERVER: one export of NBD_OPT_LIST.
    mutating func writeServerReply(_ option: UInt32, name: String, description: String?) {
        var entry = ByteBuffer()
        entry.writeInteger(UInt32(name.utf8.count))
        entry.writeString(name)
        if let description { entry.writeString(description) }
        writeOptionReply(option, .server, data: entry)
    }

    /// NBD_REP_INFO of NBD_INFO_EXPORT: size and transmission flags.
    mutating func writeExportInfo(_ option: UInt32, size: UInt64, flags: TransmissionFlags) {
        var info = ByteBuffer()
        info.writeInteger(InfoType.export.rawValue)
        info.writeInteger(size)
        info.writeInteger(flags.rawValue)
        writeOptionReply(option, .info, data: info)
    }

    /// NBD_REP_INFO of NBD_INFO_NAME or NBD_INFO_DESCRIPTION.
    mutating func writeTextInfo(_ option: UInt32, _ type: InfoType, _ text: String) {
        var info = ByteBuffer()
        info.writeInteger(type.rawValue)
        info.writeBytes(protocolString(text))
        writeOptionReply(option, .info, data: info)
    }

    /// NBD_REP_INFO of NBD_INFO_BLOCK_SIZE.
    mutating func writeBlockSizeInfo(_ option: UInt32, _ sizes: BlockSizes) {
        var info = ByteBuffer()
        info.writeInteger(InfoType.blockSize.rawValue)
        info.writeInteger(sizes.minimum)
        info.writeInteger(sizes.preferred)
        info.writeInteger(sizes.maximumPayload)
        writeOptionReply(option, .info, data: info)
    }

    /// NBD_REP_META_CONTEXT: a context's id (0 when listing) and name.
    mutating func writeMetaContextReply(_ option: UInt32, id: UInt32, name: String) {
        var entry = ByteBuffer()
        entry.writeInteger(id)
        entry.writeString(name)
        writeOptionReply(option, .metaContext, data: entry)
    }

    /// What the handshake decided to answer option `code` with.
    mutating func writeAnswer(_ code: UInt32, _ answer: HandshakeStateMachine.Answer) {
        switch answer {
        case .ack:
            writeOptionReply(code, .ack)
        case .error(let type, let message):
            writeOptionError(code, type, message: message)
        case .exports(let exports):
            for export in exports {
                writeServerReply(code, name: export.name, description: export.description)
            }
            writeOptionReply(code, .ack)
        case .info(let session, let requests):
            let export = session.export
            writeExportInfo(code, size: export.target.size, flags: session.flags)
            if requests.contains(InfoType.name.rawValue) {
                writeTextInfo(code, .name, export.name)
            }
            if requests.contains(InfoType.description.rawValue), let description = export.description {
                writeTextInfo(code, .description, description)
            }
            // Sent whether asked or not: the minimum block size is not the
            // protocol's default of 1, and clients ignore what they did not ask.
            writeBlockSizeInfo(code, export.target.blockSizes)
            writeOptionReply(code, .ack)
        case .metaContexts(let contexts, let listing):
            for context in contexts {
                writeMetaContextReply(code, id: listing ? 0 : context.id, name: context.name)
            }
            writeOptionReply(code, .ack)
        }
    }

    /// The answer to NBD_OPT_EXPORT_NAME: size, flags, and (unless the
    /// client asked for none) 124 bytes of zeroes.
    mutating func writeExportNameReply(size: UInt64, flags: TransmissionFlags, zeroes: Bool) {
        writeInteger(size)
        writeInteger(flags.rawValue)
        if zeroes { writeRepeatingByte(0, count: 124) }
    }

    // A reply's header is made on the stack and goes in with one `writeBytes`:
    // each `writeInteger` (and `writeMultipleIntegers`, an integer at a time)
    // checks the buffer's uniqueness, its capacity and its storage's
    // exclusive access again, and every request has a header.
    mutating func writeSimpleReply(error: UInt32, cookie: UInt64) {
        writeHeader(byteCount: 16) { header in
            header.storeBytes(of: Magic.simpleReply.bigEndian, toByteOffset: 0, as: UInt32.self)
            header.storeBytes(of: error.bigEndian, toByteOffset: 4, as: UInt32.self)
            header.storeBytes(of: cookie.bigEndian, toByteOffset: 8, as: UInt64.self)
        }
    }

    mutating func writeChunkHeader(flags: UInt16, type: ChunkType, cookie: UInt64, length: Int) {
        writeHeader(byteCount: 20) { header in
            header.storeBytes(of: Magic.structuredReply.bigEndian, toByteOffset: 0, as: UInt32.self)
            header.storeBytes(of: flags.bigEndian, toByteOffset: 4, as: UInt16.self)
            header.storeBytes(of: type.rawValue.bigEndian, toByteOffset: 6, as: UInt16.self)
            header.storeBytes(of: cookie.bigEndian, toByteOffset: 8, as: UInt64.self)
            header.storeBytes(of: UInt32(length).bigEndian, toByteOffset: 16, as: UInt32.self)
        }
    }

    private mutating func writeHeader(byteCount: Int, _ fill: (UnsafeMutableRawBufferPointer) -> Void) {
        withUnsafeTemporaryAllocation(byteCount: byteCount, alignment: 8) { header in
            fill(header)
            writeBytes(UnsafeRawBufferPointer(header))
        }
    }

    /// NBD_REPLY_TYPE_ERROR, the final chunk, with a message.
    mutating func writeErrorChunk(error: UInt32, message: String, cookie: UInt64) {
        let text = protocolString(message)
        writeChunkHeader(flags: ChunkFlag.done, type: .error, cookie: cookie, length: 6 + text.count)
        writeInteger(error)
        writeInteger(UInt16(text.count))
        writeBytes(text)
    }

    mutating func writeHoleChunk(offset: UInt64, length: UInt32, cookie: UInt64, done: Bool) {
        writeChunkHeader(flags: done ? ChunkFlag.done : 0, type: .offsetHole, cookie: cookie, length: 12)
        writeInteger(offset)
        writeInteger(length)
    }

    mutating func writeNoneChunk(cookie: UInt64) {
        writeChunkHeader(flags: ChunkFlag.done, type: .none, cookie: cookie, length: 0)
    }

    mutating func writeBlockStatusChunk(contextID: UInt32, extents: [Extent], cookie: UInt64, done: Bool) {
        writeChunkHeader(flags: done ? ChunkFlag.done : 0, type: .blockStatus, cookie: cookie,
                         length: 4 + 8 * extents.count)
        writeInteger(contextID)
        for extent in extents {
            writeInteger(extent.length)
            writeInteger(extent.flags)
        }
    }
}

/// `text` as the protocol's strings must be: UTF-8 of at most 4096 bytes,
/// cut at a character boundary (a client's name may be in any script).
func protocolString(_ text: String) -> [UInt8] {
    var bytes = Array(text.utf8)
    guard bytes.count > WireSize.maxString else { return bytes }
    var end = WireSize.maxString
    while end > 0 && bytes[end] & 0xC0 == 0x80 { end -= 1 }  // not inside a character
    bytes.removeSubrange(end...)
    return bytes
}
