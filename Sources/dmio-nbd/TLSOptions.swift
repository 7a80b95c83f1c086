import ArgumentParser
import Glibc
import LibNBD
import NBD

/// `serve`'s TLS, with nbdkit's flags and folder layout.
struct ServerTLSOptions: ParsableArguments {
    @Option(help: ArgumentHelp("TLS for clients: off, on (offered; plaintext clients too) or require "
                               + "(nothing but TLS is answered). Recommended on TCP: require.",
                               valueName: "off|on|require"))
    var tls: TLSPolicy = .off

    @Option(help: ArgumentHelp("The folder of \(ServerTLS.serverCertificate), \(ServerTLS.serverKey) and, for "
                               + "--tls-verify-peer, \(ServerTLS.caCertificate) (default: \(Self.defaultFolderDescription)).",
                               valueName: "dir"))
    var tlsCertificates: String?

    @Flag(help: "Refuse a client without a certificate signed by the folder's \(ServerTLS.caCertificate).")
    var tlsVerifyPeer = false

    @Option(help: ArgumentHelp("Use pre-shared keys instead of certificates: a file of username:hexkey lines, "
                               + "as `psktool -u USER -p FILE` makes.", valueName: "file"))
    var tlsPsk: String?

    /// nbdkit's /etc/pki/nbdkit and ~/.pki/nbdkit, for this program.
    static var defaultFolder: String {
        getuid() == 0 ? "/etc/pki/dmio-nbd" : (environment("HOME") ?? "") + "/.pki/dmio-nbd"
    }
    static let defaultFolderDescription = "/etc/pki/dmio-nbd as root, else ~/.pki/dmio-nbd"

    func validate() throws {
        if tls == .off {
            for (given, name) in [(tlsCertificates != nil, "--tls-certificates"), (tlsVerifyPeer, "--tls-verify-peer"),
                                  (tlsPsk != nil, "--tls-psk")] where given {
                throw ValidationError("\(name) needs --tls=on or --tls=require")
            }
        }
        if tlsPsk != nil && (tlsCertificates != nil || tlsVerifyPeer) {
            throw ValidationError("--tls-psk uses pre-shared keys instead of certificates: "
                                  + "give it without --tls-certificates and --tls-verify-peer")
        }
    }

    /// The server's TLS, its files read now: nil when off.
    func load() throws -> ServerTLS? {
        guard tls != .off else { return nil }
        do {
            if let tlsPsk { return try .preSharedKeys(file: absolutePath(tlsPsk), policy: tls) }
            return try .certificates(in: absolutePath(tlsCertificates ?? Self.defaultFolder),
                                     verifyPeer: tlsVerifyPeer, policy: tls)
        } catch {
            throw CleanExit.message("--tls=\(tls): \(error)", code: 1)
        }
    }
}

extension TLSPolicy: ExpressibleByArgument {}

/// The TLS of legs named by `nbds://` and `nbds+unix://` URIs (libnbd's
/// settings; a URI's own tls-certificates= or tls-psk-file= wins).
struct RemoteTLSOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The folder of the CA's ca-cert.pem (and client-cert.pem, client-key.pem if the "
                               + "leg's server wants a client certificate) for nbds legs (default: libnbd's).",
                               valueName: "dir"))
    var remoteTlsCertificates: String?

    @Option(help: ArgumentHelp("A PSK file (username:hexkey lines) for nbds legs.", valueName: "file"))
    var remoteTlsPsk: String?

    @Option(help: ArgumentHelp("The user of --remote-tls-psk to be (default: the login name; a leg's URI "
                               + "may say user@host).", valueName: "name"))
    var remoteTlsUsername: String?

    @Flag(inversion: .prefixedNo, help: "Check an nbds leg server's certificate against the CA and its host name.")
    var remoteTlsVerifyPeer = true

    var settings: NBDTLSOptions {
        NBDTLSOptions(certificates: remoteTlsCertificates.map(absolutePath), pskFile: remoteTlsPsk.map(absolutePath),
                      username: remoteTlsUsername, verifyPeer: remoteTlsVerifyPeer)
    }
}
