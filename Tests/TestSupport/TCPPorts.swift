import Glibc

/// A TCP port of 127.0.0.1 that nothing listens on now (another process
/// may take it before the caller does: a server started on it must be
/// seen to listen).
public func freeTCPPort() -> Int {
    let listener = TCPListener()
    defer { listener.close() }
    return listener.port
}

/// A listening TCP socket on 127.0.0.1, on a port the kernel chose, held
/// by the test process.
public struct TCPListener {
    public let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)

    public var port: Int {
        var address = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    public init() {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        _ = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        listen(fd, 1)
    }

    public func close() { Glibc.close(fd) }
}
