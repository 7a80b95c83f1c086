import Logging
@testable import NBD
import NIOCore
import NIOEmbedded
import NIOSSL
import TestSupport
import Testing

/// NBD_OPT_STARTTLS on a server pipeline, with a TLS client on a second
/// EmbeddedChannel: the bytes between them are shuttled by hand.
@Suite struct StartTLSTests {
    private func server(_ certificates: TestCertificates) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        try NBDServer.configure(channel, exports: [Export(name: "mem", target: MemoryTarget(size: 1 << 20))],
                                tls: try .preSharedKeys(file: certificates.psk, policy: .require), logger: logger)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 10809)).wait()
        _ = try channel.readOutbound(as: ByteBuffer.self)  // the greeting
        return channel
    }

    private func tlsClient() throws -> EmbeddedChannel {
        var configuration = TLSConfiguration.makePreSharedKeyConfiguration()
        configuration.maximumTLSVersion = .tlsv12
        configuration.cipherSuites = "ECDHE-PSK-AES128-CBC-SHA"
        configuration.pskClientProvider = { _ in
            PSKClientIdentityResponse(key: NIOSSLSecureBytes(TestCertificates.pskKey), identity: TestCertificates.pskUser)
        }
        let context = try NIOSSLContext(configuration: configuration)
        let channel = EmbeddedChannel(handler: try NIOSSLClientHandler(context: context, serverHostname: nil))
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 10809)).wait()
        return channel
    }

    /// Moves what each side wrote to the other until neither writes more.
    private func shuttle(_ client: EmbeddedChannel, _ server: EmbeddedChannel) throws {
        var moved = true
        while moved {
            moved = false
            while let bytes = try client.readOutbound(as: ByteBuffer.self) {
                try server.writeInbound(bytes)
                moved = true
            }
            while let bytes = try server.readOutbound(as: ByteBuffer.self) {
                try client.writeInbound(bytes)
                moved = true
            }
        }
    }

    /// The client flags and NBD_OPT_STARTTLS, with `options` in the same packet.
    private func sendStartTLS(_ server: EmbeddedChannel, followedBy options: [UInt32] = []) throws {
        var packet = ByteBuffer()
        packet.writeInteger(UInt32(1))
        packet.writeOption(OptionCode.startTLS.rawValue)
        for option in options { packet.writeOption(option) }
        try server.writeInbound(packet)
    }

    /// Option replies as (option, type), from plaintext bytes.
    private func replies(_ bytes: ByteBuffer?) -> [(UInt32, UInt32)] {
        guard var bytes else { return [] }
        var found: [(UInt32, UInt32)] = []
        while bytes.readInteger(as: UInt64.self) == Magic.optionReply {
            let option = bytes.readInteger(as: UInt32.self)!
            let type = bytes.readInteger(as: UInt32.self)!
            bytes.moveReaderIndex(forwardBy: Int(bytes.readInteger(as: UInt32.self)!))
            found.append((option, type))
        }
        return found
    }

    private func decrypted(_ client: EmbeddedChannel) throws -> ByteBuffer? {
        var all: ByteBuffer?
        while var bytes = try client.readInbound(as: ByteBuffer.self) {
            all = all ?? ByteBuffer()
            all!.writeBuffer(&bytes)
        }
        return all
    }

    /// CVE-2021-3716's injection: an option in the packet of STARTTLS, sent
    /// before the client could have seen the acknowledgement, is not read,
    /// neither in plaintext nor once TLS runs; options through TLS are.
    @Test func anOptionSentWithStartTLSIsNeverAnswered() throws {
        let certificates = try TestCertificates()
        let server = try server(certificates)
        try sendStartTLS(server, followedBy: [OptionCode.structuredReply.rawValue])
        let plaintext = replies(try server.readOutbound(as: ByteBuffer.self))
        #expect(plaintext.map(\.0) == [OptionCode.startTLS.rawValue])
        #expect(plaintext.map(\.1) == [OptionReply.ack.rawValue])

        let client = try tlsClient()
        try shuttle(client, server)
        #expect(try decrypted(client) == nil, "the structured reply option that came before TLS is answered")

        var list = ByteBuffer()
        list.writeOption(OptionCode.list.rawValue)
        try client.writeOutbound(list)
        try shuttle(client, server)
        #expect(replies(try decrypted(client)).map(\.1) == [OptionReply.server.rawValue, OptionReply.ack.rawValue])
    }

    /// A client that is not TLS after STARTTLS: the handshake fails, the
    /// connection closes, and nothing is answered.
    @Test func garbageWhereTheTLSHandshakeShouldBeClosesTheConnection() throws {
        let certificates = try TestCertificates()
        let server = try server(certificates)
        try sendStartTLS(server)
        _ = try server.readOutbound(as: ByteBuffer.self)
        var garbage = ByteBuffer()
        garbage.writeOption(OptionCode.list.rawValue)
        _ = try? server.writeInbound(garbage)
        server.embeddedEventLoop.run()
        #expect(!server.isActive)
    }
}
