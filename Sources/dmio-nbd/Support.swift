import ArgumentParser
import CDMIOSupport
import DMIO
import Dispatch
import Glibc
import Logging

/// An environment variable's value; nil when unset or empty (as XDG's
/// base-directory variables are read).
func environment(_ name: String) -> String? {
    guard let value = getenv(name).map({ String(cString: $0) }), !value.isEmpty else { return nil }
    return value
}

/// $XDG_RUNTIME_DIR, or /run: where a server's sockets go by default.
let runtimeFolder = environment("XDG_RUNTIME_DIR") ?? "/run"

/// $XDG_RUNTIME_DIR/dmio-nbd.sock, or /run/dmio-nbd.sock.
let defaultSocketPath = runtimeFolder + "/dmio-nbd.sock"

/// A file this server made (a socket, its pid file), known by its device
/// and inode: removed at the stop only while its path names it still, and
/// while what the file says (a socket's listener, a pid file's pid) is
/// this server's. A server started meanwhile may have made its own there
/// (a stale socket is claimed once this one stops listening, a pid file
/// rewritten), and a file system may give it the inode number this one's
/// freed: so the inode alone does not tell.
struct FileMade {
    private(set) var path: String
    private let device: dev_t
    private let inode: ino_t

    /// `path` as it is now; nil if there is nothing there.
    init?(_ path: String) {
        var info = stat()
        guard lstat(path, &info) == 0 else { return nil }
        (self.path, device, inode) = (path, info.st_dev, info.st_ino)
    }

    /// The file was renamed to `path`.
    mutating func moved(to path: String) { self.path = path }

    /// Removes the file if it is the one made, and `isOurs` of its path.
    func remove(if isOurs: (String) -> Bool) {
        var info = stat()
        guard lstat(path, &info) == 0, info.st_dev == device, info.st_ino == inode, isOurs(path) else { return }
        unlink(path)
    }
}

/// A leg or socket as an absolute path (a URI as it is), so that status,
/// the log and a server in another folder name the same file.
func absolutePath(_ spec: String) -> String {
    guard !spec.hasPrefix("/"), !DeviceSpec.isURI(spec) else { return spec }
    var folder = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    guard getcwd(&folder, folder.count) != nil else { return spec }
    let base = String(cString: folder)
    let relative = spec.hasPrefix("./") ? String(spec.dropFirst(2)) : spec
    return (base == "/" ? "" : base) + "/" + relative
}

/// How to run this program again, for the lines it prints: `dmio-nbd`
/// when that is what PATH finds, else the executable's own path.
let commandPath: String = {
    var bytes = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let count = readlink("/proc/self/exe", &bytes, bytes.count - 1)
    guard count > 0 else { return "dmio-nbd" }
    let executable = String(cString: bytes)
    let folders = (environment("PATH") ?? "").split(separator: ":")
    let onPath = folders.first { access("\($0)/dmio-nbd", X_OK) == 0 }.map { folder -> String in
        let found = realpath("\(folder)/dmio-nbd", nil)
        defer { free(found) }
        return found.map { String(cString: $0) } ?? ""
    }
    return onPath == executable ? "dmio-nbd" : executable
}()

func makeLogger(verbose: Bool) -> Logger {
    let journal = JournalLogHandler.standardErrorIsJournal
    LoggingSystem.bootstrap { label -> any LogHandler in
        if journal { return JournalLogHandler() }
        return StreamLogHandler.standardError(label: label)
    }
    var logger = Logger(label: "dmio-nbd")
    logger.logLevel = verbose ? .debug : .info
    return logger
}

/// A size as given on the command line: 4096, 512K, 512KiB, 512KB, 1G...
/// Every unit is a power of 1024, as in qemu-img and mdadm. Keeps the text
/// as typed, for messages about it.
struct ByteSize: CustomStringConvertible {
    let bytes: UInt64
    let text: String

    /// Each unit as it may be written (upper case), and its bytes.
    private static let units: [String: UInt64] = {
        var units: [String: UInt64] = ["": 1, "B": 1]
        for (power, letter) in ["K", "M", "G", "T"].enumerated() {
            for spelling in [letter, letter + "B", letter + "IB"] { units[spelling] = 1 << (10 * (power + 1)) }
        }
        return units
    }()

    static let accepted = "a number of bytes, or with a unit: K, M, G or T (also KiB, KB, k...), "
        + "powers of 1024, e.g. 512K or 10G"

    /// For `@Option(transform:)`: an unreadable size is refused with what is accepted.
    @Sendable static func parse(_ text: String) throws -> ByteSize {
        guard let size = ByteSize(text) else {
            throw ValidationError("'\(text)' is not a size: give \(accepted)")
        }
        return size
    }

    init?(_ text: String) {
        let digits = text.prefix { $0.isASCII && $0.isNumber }
        guard let value = UInt64(digits), value > 0, let scale = Self.units[text.dropFirst(digits.count).uppercased()] else {
            return nil
        }
        let (bytes, overflow) = value.multipliedReportingOverflow(by: scale)
        if overflow { return nil }
        self.bytes = bytes
        self.text = text
    }

    /// "100 (100 bytes)", "1G (1073741824 bytes)".
    var description: String { "\(text) (\(bytes) bytes)" }
}

/// host:port, host (port 10809) or :port (all addresses).
struct TCPAddress {
    let host: String
    let port: Int

    init?(argument text: String) {
        guard let colon = text.lastIndex(of: ":") else {
            guard !text.isEmpty else { return nil }
            (host, port) = (text, 10809)
            return
        }
        let name = String(text[..<colon])
        guard let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else { return nil }
        let bare = name.hasPrefix("[") && name.hasSuffix("]") ? String(name.dropFirst().dropLast()) : name
        (host, self.port) = (bare.isEmpty ? "0.0.0.0" : bare, port)
    }
}

/// SIGTERM, SIGINT and SIGHUP (an ssh session that closes, as qemu-nbd
/// takes it) each ask for a clean stop. Installed before anything is
/// opened, so that a signal during a long start-up is a clean stop too:
/// the start-up looks at `received` between its steps. A second signal
/// forces the stop: `onSecond` runs, then the process exits with 1.
final class StopSignals: @unchecked Sendable {
    private let queue = DispatchQueue(label: "signals")
    private var sources: [DispatchSourceSignal] = []
    /// Touched on `queue` only.
    private var first: String?
    private var waiting: CheckedContinuation<String, Never>?
    private var onSecond: (String) -> Void = { _ in }

    init() {
        for (number, name) in [(SIGTERM, "SIGTERM"), (SIGINT, "SIGINT"), (SIGHUP, "SIGHUP")] {
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: queue)
            source.setEventHandler { [unowned self] in arrived(name) }
            source.resume()
            sources.append(source)
        }
    }

    private func arrived(_ name: String) {
        guard first == nil else {
            onSecond(name)
            // As a crash would, while other threads still run: no exit handlers.
            fflush(nil)
            _exit(1)
        }
        first = name
        waiting?.resume(returning: name)
        waiting = nil
    }

    /// The first signal, if one came.
    var received: String? { queue.sync { first } }

    /// What a stop that the server asked for itself (`request`) is named.
    static let ownershipLost = "ownership-lost"
    /// Why the server asked for its own stop, if it did.
    var reason: String? { queue.sync { requestedBecause } }
    /// Touched on `queue` only.
    private var requestedBecause: String?

    /// A stop the server asks for itself, as if a first signal named `name`
    /// came; during a stop under way (a lease found lost as it stops), only
    /// its reason is kept, for the exit status.
    func request(_ name: String, because why: String) {
        queue.async { [self] in
            if requestedBecause == nil { requestedBecause = why }
            if first == nil { arrived(name) }
        }
    }

    /// What a second signal does before the process exits: say so.
    func whenForced(_ body: @escaping (String) -> Void) {
        queue.sync { onSecond = body }
    }

    /// Waits for the first signal (returns at once if it came) and returns its name.
    func wait() async -> String {
        await withCheckedContinuation { continuation in
            queue.async { [self] in
                if let first { continuation.resume(returning: first) } else { waiting = continuation }
            }
        }
    }
}
