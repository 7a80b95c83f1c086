import DMIO
import Dispatch
import Glibc
import NBD

/// Sockets handed over by systemd, or by libnbd's `nbdinfo -- [ CMD ]`
/// (sd_listen_fds(3)'s protocol, as nbdkit reads it): LISTEN_PID names this
/// process, LISTEN_FDS says how many sockets follow fd 3.
enum SocketActivation {
    static let firstDescriptor: Int32 = 3
    static let maxSockets = 16

    /// The sockets, or nil when none were handed to this process. The
    /// variables are unset (a program this one starts must not take them
    /// for its own) and the sockets closed on exec.
    static func listeners() throws -> [Listener]? {
        guard let pid = environment("LISTEN_PID"), pid_t(pid) == getpid() else { return nil }
        let count = environment("LISTEN_FDS").flatMap { Int($0) } ?? 0
        for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] { unsetenv(name) }
        guard (1...maxSockets).contains(count) else {
            throw CleanExit.message("socket activation: LISTEN_FDS is \(count); 1 to \(maxSockets) sockets are served", code: 1)
        }
        return try (0..<Int32(count)).map { offset in
            let fd = firstDescriptor + offset
            _ = fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC)
            return Listener(socket: fd, address: try listeningAddress(fd))
        }
    }

    /// What a handed-over socket listens on; one that is not a listening
    /// stream socket is refused.
    private static func listeningAddress(_ fd: Int32) throws -> ListenAddress {
        var listening: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) == 0, listening == 1 else {
            throw CleanExit.message("socket activation: fd \(fd) is not a listening socket", code: 1)
        }
        var storage = sockaddr_storage()
        length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        return try withUnsafeMutablePointer(to: &storage) { pointer in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
                guard getsockname(fd, address, &length) == 0 else {
                    throw CleanExit.message("socket activation: fd \(fd): \(errnoDescription(errno))", code: 1)
                }
                switch Int32(address.pointee.sa_family) {
                case AF_UNIX:
                    let path = UnsafeMutableRawPointer(pointer).advanced(by: MemoryLayout<sa_family_t>.size)
                        .assumingMemoryBound(to: CChar.self)
                    return .unix(path: String(cString: path))
                case AF_INET, AF_INET6:
                    var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
                    var port = [CChar](repeating: 0, count: Int(NI_MAXSERV))
                    getnameinfo(address, length, &host, socklen_t(host.count), &port, socklen_t(port.count),
                                NI_NUMERICHOST | NI_NUMERICSERV)
                    return .tcp(host: String(cString: host), port: Int(String(cString: port)) ?? 0)
                default:
                    throw CleanExit.message("socket activation: fd \(fd) is neither a unix nor a TCP socket", code: 1)
                }
            }
        }
    }
}

/// sd_notify(3) to the service manager, when NOTIFY_SOCKET names one:
/// READY=1 once the mirror is served, STATUS= with its state as it changes,
/// STOPPING=1 at the stop.
final class ServiceNotifier: @unchecked Sendable {
    private let fd: Int32
    private var address = sockaddr_un()
    /// The name's bytes count: an abstract name ("@...", its first byte NUL
    /// on the wire) has no NUL at its end.
    private let addressLength: socklen_t
    private let queue = DispatchQueue(label: "sd-notify")
    private var timer: DispatchSourceTimer?
    private var lastStatus: String?

    /// nil where no service manager listens.
    init?() {
        guard let path = environment("NOTIFY_SOCKET"), path.hasPrefix("/") || path.hasPrefix("@") else { return nil }
        // Unset, as sd_notify's unset_environment: a leg's helper must not notify for us.
        unsetenv("NOTIFY_SOCKET")
        guard path.utf8.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        addressLength = socklen_t(MemoryLayout<sa_family_t>.size + path.utf8.count + (path.hasPrefix("@") ? 0 : 1))
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            path.utf8CString.withUnsafeBytes { raw.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0.prefix(raw.count))) }
            // An abstract socket: its name starts with a NUL.
            if path.hasPrefix("@") { raw[0] = 0 }
        }
    }

    deinit { close(fd) }

    func send(_ fields: [String]) {
        let message = fields.joined(separator: "\n")
        let length = addressLength
        _ = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { target in
                message.withCString { sendto(fd, $0, strlen($0), Int32(MSG_NOSIGNAL), target, length) }
            }
        }
    }

    /// READY=1, then STATUS= whenever `status` says something new (looked
    /// at every few seconds: a degraded leg shows in `systemctl status`).
    func ready(status: @escaping @Sendable () -> String) {
        queue.sync {
            lastStatus = status()
            send(["READY=1", "MAINPID=\(getpid())", "STATUS=\(lastStatus!)"])
            let timer = DispatchSource.makeTimerSource(queue: queue)
            timer.schedule(deadline: .now() + .seconds(5), repeating: .seconds(5))
            timer.setEventHandler { [unowned self] in
                let now = status()
                guard now != lastStatus else { return }
                lastStatus = now
                send(["STATUS=\(now)"])
            }
            timer.resume()
            self.timer = timer
        }
    }

    func stopping(_ why: String) {
        queue.sync {
            timer?.cancel()
            send(["STOPPING=1", "STATUS=\(why)"])
        }
    }
}

/// `--pidfile`: written once every socket listens and the mirror is open
/// (qemu-storage-daemon's rule: whoever waits for it may connect at once),
/// whole or not at all, and removed at the stop.
struct PidFile {
    let file: FileMade?

    static func write(_ path: String) throws -> PidFile {
        let temporary = "\(path).\(getpid()).tmp"
        // A name others could guess: never through a link they planted.
        unlink(temporary)
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw CleanExit.message("cannot write --pidfile \(path): \(errnoDescription(errno))", code: 1) }
        let text = "\(getpid())\n"
        let written = text.withCString { Glibc.write(fd, $0, strlen($0)) }
        close(fd)
        guard written == text.utf8.count, rename(temporary, path) == 0 else {
            let error = errno
            unlink(temporary)
            throw CleanExit.message("cannot write --pidfile \(path): \(errnoDescription(error))", code: 1)
        }
        return PidFile(file: FileMade(path))
    }

    /// A pid file rewritten by a server started meanwhile stays.
    func remove() { file?.remove { readText($0) == "\(getpid())\n" } }
}
