import CDMIOSupport
import DMIO
import Glibc
import NBD

/// A socket bound and listening before anything else starts (no leg is
/// opened, no metadata written, before a port in use or a missing folder is
/// refused), with refusals that say what to fix. Clients that connect while
/// the mirror starts wait in the backlog.
struct Listener {
    let socket: Int32
    let address: ListenAddress
    /// The socket file, for a unix socket: removed at the stop.
    private(set) var file: FileMade?
    var path: String? { file?.path }

    /// A unix socket at `path`. A stale socket file (left by a crash) is
    /// replaced; one a live server answers on is refused, naming its pid.
    /// `hint` says how to choose another place, for a default path. Made
    /// with `mode` when given, else as the process's umask makes files (who
    /// may connect to an NBD socket may read and write the device).
    static func unix(_ path: String, mode: mode_t? = nil, hint: String? = nil) throws -> Listener {
        let folder = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        try claimSocketPath(path)
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw CleanExit.message("cannot make a socket: \(errnoDescription(errno))", code: 1) }
        let bound = try withUnixAddress(path) { address, length in
            // The mode is set at bind: no moment in which others may connect.
            guard let mode else { return bind(fd, address, length) }
            let mask = umask(~mode & 0o777)
            defer { umask(mask) }
            return bind(fd, address, length)
        }
        guard bound == 0, Glibc.listen(fd, 256) == 0 else {
            let error = errno
            Glibc.close(fd)
            switch error {
            case ENOENT:
                throw CleanExit.message("cannot make socket \(path): directory \(folder.isEmpty ? "/" : folder) does not exist", code: 1)
            case EACCES, EPERM, EROFS:
                throw CleanExit.message("\(folder.isEmpty ? "/" : folder) is not writable"
                                        + (hint.map { ": \($0)" } ?? " (cannot make socket \(path))"), code: 1)
            default:
                throw CleanExit.message("cannot make socket \(path): \(errnoDescription(error))", code: 1)
            }
        }
        return Listener(socket: fd, address: .unix(path: path), file: FileMade(path))
    }

    /// A TCP socket on `address` (port 0: one the kernel picks).
    static func tcp(_ address: TCPAddress) throws -> Listener {
        var hints = addrinfo()
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var found: UnsafeMutablePointer<addrinfo>?
        let resolved = getaddrinfo(address.host, "\(address.port)", &hints, &found)
        guard resolved == 0, let first = found else {
            throw CleanExit.message("cannot listen on \(address.host): \(String(cString: gai_strerror(resolved)))", code: 1)
        }
        defer { freeaddrinfo(found) }
        let fd = Glibc.socket(first.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw CleanExit.message("cannot make a socket: \(errnoDescription(errno))", code: 1) }
        var on: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, socklen_t(MemoryLayout<Int32>.size))
        guard bind(fd, first.pointee.ai_addr, first.pointee.ai_addrlen) == 0, Glibc.listen(fd, 256) == 0 else {
            let error = errno
            Glibc.close(fd)
            switch error {
            case EADDRINUSE:
                let holders = portListeners(address.port)
                throw CleanExit.message("port \(address.port) is in use"
                                        + (holders.isEmpty ? "" : " (by \(holders.joined(separator: ", ")))"), code: 1)
            case EADDRNOTAVAIL:
                throw CleanExit.message("cannot listen on \(address.host): not an address of this machine", code: 1)
            case EACCES where address.port < 1024:
                throw CleanExit.message("port \(address.port) is below 1024: only root may listen on it", code: 1)
            default:
                throw CleanExit.message("cannot listen on \(address.host):\(address.port): \(errnoDescription(error))", code: 1)
            }
        }
        var bound = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let port = withUnsafeMutablePointer(to: &bound) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { address -> Int in
                guard getsockname(fd, address, &length) == 0 else { return 0 }
                // sin_port and sin6_port sit at the same offset, in network order.
                return Int(UInt16(bigEndian: UnsafeRawPointer(address).load(fromByteOffset: 2, as: UInt16.self)))
            }
        }
        return Listener(socket: fd, address: .tcp(host: address.host, port: port == 0 ? address.port : port), file: nil)
    }

    /// Moves a unix socket to `newPath` (connections follow the file).
    mutating func move(to newPath: String) throws {
        guard let path else { return }
        guard rename(path, newPath) == 0 else {
            throw CleanExit.message("cannot move socket \(path) to \(newPath): \(errnoDescription(errno))", code: 1)
        }
        file?.moved(to: newPath)
    }

    /// Closes a socket that was never handed to a server, and removes its file.
    func close() {
        Glibc.close(socket)
        removeFile()
    }

    /// Call once the socket is closed: a socket file that a process
    /// listens on still is another server's.
    func removeFile() {
        file?.remove { path in (try? listenerPID(path)).map { $0 == getpid() } ?? true }
    }
}

/// The processes listening on TCP `port`, from /proc/net/tcp and tcp6
/// (their socket inodes) and the processes' open files.
private func portListeners(_ port: Int) -> [String] {
    var sockets: Set<String> = []
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        // sl local_address rem_address st ... inode
        for line in (readText(table)?.split(separator: "\n") ?? []).dropFirst() {
            let fields = line.split(separator: " ")
            guard fields.count > 9, fields[3] == "0A", let colon = fields[1].lastIndex(of: ":"),
                  Int(fields[1][fields[1].index(after: colon)...], radix: 16) == port else { continue }
            sockets.insert("socket:[\(fields[9])]")
        }
    }
    return sockets.isEmpty ? [] : OpenFiles.holders { target, _ in sockets.contains(target) }
}

/// Makes `path` free for a new socket: a stale socket left by a crash is
/// removed; one that a live server answers on is an error naming its pid.
func claimSocketPath(_ path: String) throws {
    var info = stat()
    guard lstat(path, &info) == 0 else { return }
    guard info.st_mode & S_IFMT == S_IFSOCK else {
        throw CleanExit.message("\(path) exists and is not a socket", code: 1)
    }
    if let pid = try listenerPID(path) {
        throw CleanExit.message("socket \(path) in use\(pid > 0 ? " by pid \(pid)" : "")", code: 1)
    }
    unlink(path)
}

/// The process that listens on the unix socket at `path` (0 if it cannot
/// be told); nil when none does.
func listenerPID(_ path: String) throws -> pid_t? {
    let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    defer { Glibc.close(fd) }
    guard try withUnixAddress(path, { connect(fd, $0, $1) }) == 0 else { return nil }
    return dmio_peer_pid(fd)
}

/// Calls `body` (connect or bind) with the unix socket address of `path`.
func withUnixAddress(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> Int32) throws -> Int32 {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let capacity = MemoryLayout.size(ofValue: address.sun_path)
    guard path.utf8.count < capacity else {
        throw CleanExit.message("socket path \(path) is \(path.utf8.count) bytes, at most \(capacity - 1)", code: 1)
    }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        path.utf8CString.withUnsafeBytes { raw.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0.prefix(raw.count))) }
    }
    return withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
}
