import CDMIOSupport
import Dispatch
import Glibc
import Logging

/// $XDG_RUNTIME_DIR/dmio-nbd.sock, or /run/dmio-nbd.sock.
let defaultSocketPath: String = {
    if let runtime = getenv("XDG_RUNTIME_DIR").map({ String(cString: $0) }), !runtime.isEmpty {
        return runtime + "/dmio-nbd.sock"
    }
    return "/run/dmio-nbd.sock"
}()

func makeLogger(verbose: Bool) -> Logger {
    LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
    var logger = Logger(label: "dmio-nbd")
    logger.logLevel = verbose ? .debug : .info
    return logger
}

/// Sizes such as 4096, 512K, 1G (powers of 1024).
struct ByteSize {
    let bytes: UInt64

    init?(argument text: String) {
        let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        var digits = Substring(text.uppercased())
        var scale: UInt64 = 1
        if let last = digits.last, let unit = units[last] {
            scale = unit
            digits = digits.dropLast()
        }
        guard let value = UInt64(digits), value > 0 else { return nil }
        let (bytes, overflow) = value.multipliedReportingOverflow(by: scale)
        if overflow { return nil }
        self.bytes = bytes
    }
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

/// Makes `path` free for a new socket: a stale socket left by a crash is
/// removed; one that a live server answers on is an error naming its pid.
func claimSocketPath(_ path: String) throws {
    var info = stat()
    guard lstat(path, &info) == 0 else { return }
    guard info.st_mode & S_IFMT == S_IFSOCK else {
        throw CleanExit.message("\(path) exists and is not a socket", code: 1)
    }
    let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    let connected = try withUnixAddress(path) { connect(fd, $0, $1) }
    if connected == 0 {
        let pid = dmio_peer_pid(fd)
        throw CleanExit.message("socket \(path) in use\(pid > 0 ? " by pid \(pid)" : "")", code: 1)
    }
    unlink(path)
}

/// Waits for SIGTERM or SIGINT and returns its name.
func waitForStopSignal() async -> String {
    await withCheckedContinuation { continuation in
        let queue = DispatchQueue(label: "signals")
        var sources: [DispatchSourceSignal] = []
        var resumed = false
        for (number, name) in [(SIGTERM, "SIGTERM"), (SIGINT, "SIGINT")] {
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: queue)
            source.setEventHandler {
                guard !resumed else { return }
                resumed = true
                sources.forEach { $0.cancel() }
                continuation.resume(returning: name)
            }
            source.resume()
            sources.append(source)
        }
    }
}
