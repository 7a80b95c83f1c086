import ControlProtocol
import DMIO
import FoundationEssentials
import Glibc
import Mirror

/// One mirror as a control socket reports it: its status, and where it is
/// served (`unix:/run/dmio-nbd.sock`, `127.0.0.1:10809`).
struct MirrorReport: Codable {
    var mirror: MirrorStatus
    var served: [String]
}

/// The answer to a request: whether it was done (and why not), and the
/// mirror as it is after it.
struct ControlAnswer: Codable {
    var ok: Bool
    var error: String?
    var report: MirrorReport
}

/// What `status --json` and the leg commands print with `--json`.
struct StatusOutput: Codable {
    /// Changes when a field changes meaning or goes away (new fields may come).
    static let currentVersion = 1
    var version = currentVersion
    var mirrors: [MirrorReport]
}

func encodeJSON<Value: Encodable>(_ value: Value) -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    return (try? String(decoding: encoder.encode(value), as: UTF8.self)) ?? "{}"
}

/// One line from `fd` (`limit` bytes at most), without its newline.
func readLine(_ fd: Int32, limit: Int = 4096) -> String? {
    var bytes: [UInt8] = []
    var byte: UInt8 = 0
    while bytes.count < limit, read(fd, &byte, 1) == 1 {
        if byte == UInt8(ascii: "\n") { return String(decoding: bytes, as: UTF8.self) }
        bytes.append(byte)
    }
    return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self)
}

/// Sends all of `text` on socket `fd` (never raising SIGPIPE); false when
/// the peer went away or stopped reading for the socket's send timeout.
@discardableResult
func sendAll(_ fd: Int32, _ text: String) -> Bool {
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        let sent = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        if sent < 0 && errno == EINTR { continue }
        if sent <= 0 { return false }
        bytes = bytes.dropFirst(sent)
    }
    return true
}


/// Where the control sockets of the mirrors served on this machine are,
/// one per mirror, named after its UUID: `status` finds every running
/// mirror there. $XDG_RUNTIME_DIR/dmio-nbd, or /run/dmio-nbd.
enum ControlFolder {
    static var path: String { runtimeFolder + "/dmio-nbd" }

    static func socket(for mirror: MirrorUUID) -> String { "\(path)/\(mirror).ctl" }

    /// Makes the folder if missing.
    static func make() throws -> String {
        if mkdir(path, 0o755) != 0 && errno != EEXIST {
            let error = errno
            if error == EACCES || error == EROFS || error == EPERM {
                throw CleanExit.message("\(runtimeFolder) is not writable: use --control or set XDG_RUNTIME_DIR", code: 1)
            }
            throw CleanExit.message("cannot make \(path): \(errnoDescription(error))", code: 1)
        }
        return path
    }

    /// The control sockets there (not those of servers still starting).
    static var sockets: [String] {
        directoryEntries(path).filter { $0.hasSuffix(".ctl") && !$0.hasPrefix(".") }.sorted().map { "\(path)/\($0)" }
    }
}
