import Foundation
import LibNBD

/// Certificates made for one test with openssl, in the folder layouts the
/// NBD world uses: `server` (ca-cert.pem, server-cert.pem, server-key.pem;
/// dmio-nbd's, nbdkit's and qemu's), `client` (ca-cert.pem,
/// client-cert.pem, client-key.pem; libnbd's and qemu's), `stranger` (a
/// client whose certificate another CA signed, and who trusts our CA),
/// `foreign` (a client that trusts only the other CA), and `psk`, a
/// psktool-style key file for user "alice". Removed when released.
public final class TestCertificates {
    public let folder: String
    public var server: String { folder + "/server" }
    public var client: String { folder + "/client" }
    public var stranger: String { folder + "/stranger" }
    public var foreign: String { folder + "/foreign" }
    public var psk: String { folder + "/psk" }
    /// The same user with another key.
    public var wrongPSK: String { folder + "/wrong-psk" }
    public static let pskUser = "alice"
    public static let pskKey: [UInt8] = Array(repeating: [0x5A, 0x1F], count: 16).flatMap { $0 }

    public init() throws {
        var template = Array("/tmp/nbd-tls-XXXXXX".utf8CString)
        folder = String(cString: mkdtemp(&template)!)
        let make = """
            set -e
            cd '\(folder)'
            mkdir work server client stranger foreign
            ca() { openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                -keyout work/$1-key.pem -out work/$1-cert.pem -days 2 -subj "/CN=dmio-nbd test $1"; }
            leaf() {
                openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                    -keyout $1-key.pem -out work/$2.csr -subj /CN=localhost
                printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=%s\\n' $4 > work/$2.ext
                openssl x509 -req -in work/$2.csr -CA work/$3-cert.pem -CAkey work/$3-key.pem \
                    -CAcreateserial -days 2 -extfile work/$2.ext -out $1-cert.pem
            }
            ca ca
            ca other
            leaf server/server server ca serverAuth
            leaf client/client client ca clientAuth
            leaf stranger/client stranger other clientAuth
            for dir in server client stranger; do cp work/ca-cert.pem $dir/; done
            cp work/other-cert.pem foreign/ca-cert.pem
            echo '\(Self.pskUser):\(Self.pskKey.map { String(format: "%02x", $0) }.joined())' > psk
            echo '\(Self.pskUser):\(String(repeating: "0b0e", count: 16))' > wrong-psk
            rm -r work
            """
        try run(["bash", "-c", make])
    }

    /// libnbd's settings for a client that trusts our CA, with a client
    /// certificate from `folder` (`client` or `stranger`).
    public func clientTLS(_ folder: String? = nil) -> NBDTLSOptions {
        NBDTLSOptions(certificates: folder ?? client)
    }

    deinit { try? FileManager.default.removeItem(atPath: folder) }
}
