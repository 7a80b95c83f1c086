import BlockTargets
import DMIO
import Glibc
import Logging
import NIOCore
import NIOEmbedded
@testable import NBD
import TestSupport

/// What a client sends the server, fed to the server's own pipeline on an
/// EmbeddedChannel over a target in memory: the option decoder and the
/// handshake state machine (`handshake`: the bytes from the greeting on),
/// or the request framer, validation and execution (`requests`: the bytes
/// after a handshake that went right). The first byte picks the TLS policy
/// (STARTTLS included) or the export's flags, the second how the rest is cut
/// into reads, as the socket would: every boundary must frame the same.
enum ServerInput {
    static func handshake(_ bytes: UnsafeRawBufferPointer) {
        guard let first = bytes.first else { return }
        let tls: ServerTLS? = first & 3 == 0 ? nil : first & 3 == 1 ? tlsOn : tlsRequired
        serve(bytes.dropFirst(), tls: tls, readOnly: first & 4 != 0, afterHandshake: false)
    }

    static func requests(_ bytes: UnsafeRawBufferPointer) {
        guard let first = bytes.first else { return }
        serve(bytes.dropFirst(), tls: nil, readOnly: first & 1 != 0, afterHandshake: true, structured: first & 2 != 0)
    }

    /// Pre-shared keys (made once, in a file of their own): STARTTLS is
    /// answered, and what follows it is TLS that the fuzzer cannot speak.
    private static let tlsOn = tls(.on)
    private static let tlsRequired = tls(.require)

    private static func tls(_ policy: TLSPolicy) -> ServerTLS {
        var template = Array("/tmp/dmio-fuzz-psk-XXXXXX".utf8CString)
        let fd = mkstemp(&template)
        let path = String(cString: template)
        let line = "fuzz:00112233445566778899aabbccddeeff\n"
        _ = line.withCString { write(fd, $0, strlen($0)) }
        close(fd)
        defer { unlink(path) }
        return try! ServerTLS.preSharedKeys(file: path, policy: policy)
    }

    private static let logger: Logger = {
        var logger = Logger(label: "fuzz")
        logger.logLevel = .critical
        return logger
    }()

    private static func serve(_ bytes: Slice<UnsafeRawBufferPointer>, tls: ServerTLS?, readOnly: Bool,
                              afterHandshake: Bool, structured: Bool = false) {
        guard let cut = bytes.first else { return }
        let input = bytes.dropFirst()
        let target = MemoryTarget(size: 64 << 10)
        let channel = EmbeddedChannel()
        do {
            try NBDServer.configure(channel, exports: [Export(name: "mem", readOnly: readOnly, target: target)], tls: tls,
                                    load: LoopLoad(bufferLimit: 4 << 20), logger: logger)
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 10809)).wait()
            if afterHandshake { try handshake(channel, structured: structured) }
            // Reads of 1 to 64 bytes, or all at once (0).
            let piece = cut == 0 ? max(1, input.count) : Int(cut & 63) + 1
            var start = input.startIndex
            while start < input.endIndex, channel.isActive {
                let end = min(start + piece, input.endIndex)
                var buffer = channel.allocator.buffer(capacity: end - start)
                buffer.writeBytes(UnsafeRawBufferPointer(rebasing: input[start..<end]))
                try channel.writeInbound(buffer)
                channel.embeddedEventLoop.run()
                while try channel.readOutbound(as: ByteBuffer.self) != nil {}
                start = end
            }
            _ = try? channel.finish()
        } catch {
            // The server closing the connection on what it was sent is an
            // answer, not a finding; a crash or a sanitizer report is.
            _ = try? channel.finish()
        }
    }

    /// Client flags, structured replies if asked, then NBD_OPT_GO for "mem".
    private static func handshake(_ channel: EmbeddedChannel, structured: Bool) throws {
        var buffer = channel.allocator.buffer(capacity: 64)
        buffer.writeInteger(UInt32(1))
        if structured { writeOption(&buffer, code: 8, data: []) }
        let name = Array("mem".utf8)
        writeOption(&buffer, code: 7, data: withUnsafeBytes(of: UInt32(name.count).bigEndian, Array.init) + name + [0, 0])
        try channel.writeInbound(buffer)
        channel.embeddedEventLoop.run()
        while try channel.readOutbound(as: ByteBuffer.self) != nil {}
    }

    private static func writeOption(_ buffer: inout ByteBuffer, code: UInt32, data: [UInt8]) {
        buffer.writeInteger(Magic.option)
        buffer.writeInteger(code)
        buffer.writeInteger(UInt32(data.count))
        buffer.writeBytes(data)
    }
}
