import DMIO
import Glibc
import NIOCore
import NIOSSL

/// The server's TLS: its policy and the credentials it proves itself with,
/// X.509 certificates in nbdkit's and qemu's folder layout or pre-shared
/// keys in psktool's file format. Made once at start-up, where a missing or
/// unreadable file is an error that names it; each connection that sends
/// NBD_OPT_STARTTLS gets a handler of its own.
public struct ServerTLS: Sendable {
    public let policy: TLSPolicy
    /// What the credentials are, for the log.
    public let summary: String
    private let context: NIOSSLContext

    /// The files `--tls-certificates DIR` holds.
    public static let caCertificate = "ca-cert.pem"
    public static let serverCertificate = "server-cert.pem"
    public static let serverKey = "server-key.pem"

    /// Certificates from `folder`: the server's certificate and key and,
    /// with `verifyPeer`, the CA a client's certificate must be signed by
    /// (a client without one is refused).
    public static func certificates(in folder: String, verifyPeer: Bool, policy: TLSPolicy) throws -> ServerTLS {
        let chain = try load(folder, serverCertificate) { try NIOSSLCertificate.fromPEMFile($0) }
        let key = try load(folder, serverKey) { try NIOSSLPrivateKey(file: $0, format: .pem) }
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
        if verifyPeer {
            let authorities = try load(folder, caCertificate) { try NIOSSLCertificate.fromPEMFile($0) }
            configuration.trustRoots = .certificates(authorities)
            // A server has no host name to check a client's certificate against.
            configuration.certificateVerification = .noHostnameVerification
        }
        configuration.minimumTLSVersion = .tlsv12
        return try ServerTLS(policy: policy, configuration: configuration,
                             summary: "certificates in \(folder)\(verifyPeer ? ", client certificates verified" : "")")
    }

    /// Pre-shared keys from `file` (lines `username:hexkey`, as psktool
    /// writes them). A client names its user; an unknown one is refused.
    public static func preSharedKeys(file: String, policy: TLSPolicy) throws -> ServerTLS {
        let keys = try PSKFile.read(file)
        var configuration = TLSConfiguration.makePreSharedKeyConfiguration()
        configuration.pskServerProvider = { context in
            guard let key = keys[context.clientIdentity] else {
                throw TLSSetupError.unknownPSKUser(context.clientIdentity)
            }
            return PSKServerIdentityResponse(key: NIOSSLSecureBytes(key))
        }
        // BoringSSL takes pre-shared keys in TLS 1.2 only (1.3's external
        // PSKs are not in its API): a client that offers both gets 1.2.
        configuration.minimumTLSVersion = .tlsv12
        configuration.maximumTLSVersion = .tlsv12
        configuration.cipherSuites = "ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA:ECDHE-PSK-AES128-CBC-SHA"
        return try ServerTLS(policy: policy, configuration: configuration,
                             summary: "pre-shared keys of \(keys.count) users from \(file)")
    }

    private init(policy: TLSPolicy, configuration: TLSConfiguration, summary: String) throws {
        self.policy = policy
        self.summary = summary
        do {
            context = try NIOSSLContext(configuration: configuration)
        } catch {
            throw TLSSetupError.unusable(summary, "\(error)")
        }
    }

    /// The handlers of one connection's TLS, put in front of its pipeline
    /// after NBD_OPT_STARTTLS is acknowledged.
    func makeHandlers() -> [ChannelHandler] {
        [NIOSSLServerHandler(context: context), TLSInputClose()]
    }

    private static func load<T>(_ folder: String, _ name: String, _ read: (String) throws -> T) throws -> T {
        let path = folder.hasSuffix("/") ? folder + name : folder + "/" + name
        guard access(path, R_OK) == 0 else {
            throw TLSSetupError.unreadable(path, errnoDescription(errno))
        }
        do {
            return try read(path)
        } catch {
            throw TLSSetupError.unusable(path, "\(error)")
        }
    }
}

/// A stopping server closes each connection for reading and answers what
/// it read (`NBDServer.shutdown`); TLS cannot half-close a socket's input,
/// so behind TLS the input ends here: what comes after is not read, and the
/// handlers behind see the end of input as from a socket.
final class TLSInputClose: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var inputClosed = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !inputClosed else { return }
        context.fireChannelRead(data)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, case .inputClosed = event {
            // The client's end of input, once: it may also come after ours.
            guard !inputClosed else { return }
            inputClosed = true
        }
        context.fireUserInboundEventTriggered(event)
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        guard mode == .input else { return context.close(mode: mode, promise: promise) }
        promise?.succeed()
        if !inputClosed {
            inputClosed = true
            context.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        }
    }
}

/// The PSK file format of GnuTLS's psktool, which nbdkit, qemu and libnbd
/// read: one `username:hexkey` a line.
enum PSKFile {
    static func read(_ path: String) throws -> [String: [UInt8]] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw TLSSetupError.unreadable(path, errnoDescription(errno)) }
        defer { close(fd) }
        return try parse(String(decoding: readAll(fd), as: UTF8.self), path: path)
    }

    static func parse(_ text: String, path: String) throws -> [String: [UInt8]] {
        var keys: [String: [UInt8]] = [:]
        for (index, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = line.hasSuffix("\r") ? line.dropLast() : line
            if line.isEmpty { continue }
            guard let colon = line.lastIndex(of: ":"), colon != line.startIndex,
                  let key = hexBytes(line[line.index(after: colon)...]), !key.isEmpty else {
                throw TLSSetupError.badPSKLine(path, index + 1)
            }
            keys[String(line[..<colon])] = key
        }
        guard !keys.isEmpty else { throw TLSSetupError.badPSKLine(path, 0) }
        return keys
    }

    private static func hexBytes(_ hex: Substring) -> [UInt8]? {
        let digits = Array(hex.utf8)
        guard digits.count % 2 == 0 else { return nil }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(digits.count / 2)
        var index = 0
        while index < digits.count {
            guard let high = hexValue(digits[index]), let low = hexValue(digits[index + 1]) else { return nil }
            bytes.append(high << 4 | low)
            index += 2
        }
        return bytes
    }

    private static func hexValue(_ digit: UInt8) -> UInt8? {
        switch digit {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): digit - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): digit - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): digit - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}

/// TLS that cannot be set up as asked, or a client it refuses.
public enum TLSSetupError: Error, CustomStringConvertible {
    case unreadable(String, String)
    case unusable(String, String)
    /// Line 0: the file holds no key at all.
    case badPSKLine(String, Int)
    case unknownPSKUser(String)

    public var description: String {
        switch self {
        case .unreadable(let path, let why): "cannot read \(path): \(why)"
        case .unusable(let what, let why): "cannot use \(what): \(why)"
        case .badPSKLine(let path, 0): "\(path) holds no key (lines of username:hexkey, as psktool writes)"
        case .badPSKLine(let path, let line): "\(path) line \(line) is not username:hexkey (as psktool writes)"
        case .unknownPSKUser(let user): "no pre-shared key for user \"\(user)\""
        }
    }
}
