import DMIO
import FoundationEssentials
import Glibc
import Mirror

/// The control socket's protocol: a client connects, sends one request as
/// one line of JSON, and reads one answer, a JSON object, until the server
/// closes. Client and server are the same program; the JSON output of the
/// commands (`--json`) is documented in the README.
struct ControlRequest: Codable, Equatable {
    enum Command: String, Codable {
        case status, failLeg = "fail-leg", readdLeg = "readd-leg", replaceLeg = "replace-leg", events
        case addLeg = "add-leg", removeLeg = "remove-leg", setLeg = "set-leg"
        case check, repair, cancelScrub = "cancel-scrub"
    }

    var command: Command
    var leg: Int?
    /// replace-leg, add-leg: the new device, as an absolute path or a URI.
    var device: String?
    /// replace-leg, add-leg: overwrite what the device holds.
    var force: Bool?
    /// events: the mirror as it is first (`exists` events).
    var now: Bool?
    /// set-leg: whether the leg is write-mostly.
    var writeMostly: Bool?

    /// The request in `line`, or nil when it is not one.
    static func parse(_ line: String) -> ControlRequest? {
        guard let request = try? JSONDecoder().decode(ControlRequest.self, from: Data(line.utf8)) else { return nil }
        switch request.command {
        case .status, .events, .check, .repair, .cancelScrub: return request
        case .failLeg, .readdLeg, .removeLeg: return request.leg == nil ? nil : request
        case .replaceLeg: return request.leg == nil || request.device == nil ? nil : request
        case .addLeg: return request.device == nil ? nil : request
        case .setLeg: return request.leg == nil || request.writeMostly == nil ? nil : request
        }
    }
}

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
