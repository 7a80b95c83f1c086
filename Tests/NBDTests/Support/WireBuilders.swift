@testable import NBD
import NIOCore

// What a client puts on the wire, for the tests that feed the server's
// decoders and pipeline without a socket.

extension ByteBuffer {
    /// A request header, then its payload (a write's data).
    mutating func writeRequest(type: UInt16, flags: UInt16 = 0, cookie: UInt64 = 7, offset: UInt64 = 4096,
                               length: UInt32, payload: [UInt8] = [], magic: UInt32 = Magic.request) {
        writeInteger(magic)
        writeInteger(flags)
        writeInteger(type)
        writeInteger(cookie)
        writeInteger(offset)
        writeInteger(length)
        writeBytes(payload)
    }

    /// An option header saying `length` bytes of data follow.
    mutating func writeOptionHeader(_ code: UInt32, length: UInt32) {
        writeInteger(Magic.option)
        writeInteger(code)
        writeInteger(length)
    }

    /// An option with its data.
    mutating func writeOption(_ code: UInt32, _ data: [UInt8] = []) {
        writeOptionHeader(code, length: UInt32(data.count))
        writeBytes(data)
    }
}

/// A request on its own.
func request(type: UInt16, flags: UInt16 = 0, cookie: UInt64 = 7, offset: UInt64 = 4096,
             length: UInt32, payload: [UInt8] = [], magic: UInt32 = Magic.request) -> ByteBuffer {
    var buffer = ByteBuffer()
    buffer.writeRequest(type: type, flags: flags, cookie: cookie, offset: offset, length: length, payload: payload,
                        magic: magic)
    return buffer
}

/// The data of NBD_OPT_GO or NBD_OPT_INFO: an export name and the
/// information asked for.
func goData(_ name: String, requests: [UInt16] = []) -> [UInt8] {
    var data = ByteBuffer()
    data.writeInteger(UInt32(name.utf8.count))
    data.writeString(name)
    data.writeInteger(UInt16(requests.count))
    for request in requests { data.writeInteger(request) }
    return Array(data.readableBytesView)
}

/// The data of a meta context option: an export name and queries.
func metaContextData(_ export: String, _ queries: [String]) -> [UInt8] {
    var data = ByteBuffer()
    data.writeInteger(UInt32(export.utf8.count))
    data.writeString(export)
    data.writeInteger(UInt32(queries.count))
    for query in queries {
        data.writeInteger(UInt32(query.utf8.count))
        data.writeString(query)
    }
    return Array(data.readableBytesView)
}
