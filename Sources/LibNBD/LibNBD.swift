// A small Swift wrapper over libnbd's C API: the NBD client that the remote
// leg backend uses and that the tests drive servers with.
//
// No `import Glibc` in this module: libnbd.h includes glibc headers of its
// own, and a file that sees two definitions of fd_set does not compile.
internal import CLibNBD

/// A failed libnbd call, with libnbd's own message (which names the cause,
/// e.g. "connect: Connection refused") and the errno it recorded.
public struct NBDError: Error, CustomStringConvertible {
    public let errno: Int32
    public let message: String

    public init(errno: Int32, message: String) {
        self.errno = errno
        self.message = message
    }

    public var description: String { message }

    /// Captures libnbd's thread-local error of the call that just failed.
    static func last() -> NBDError {
        let text = nbd_get_error().map { String(cString: $0) } ?? "unknown libnbd error"
        return NBDError(errno: nbd_get_errno(), message: text)
    }
}

/// Flags of an NBD command, as libnbd spells them (LIBNBD_CMD_FLAG_*).
public struct NBDCommandFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let fua = NBDCommandFlags(rawValue: UInt32(LIBNBD_CMD_FLAG_FUA))
    public static let noHole = NBDCommandFlags(rawValue: UInt32(LIBNBD_CMD_FLAG_NO_HOLE))
    public static let df = NBDCommandFlags(rawValue: UInt32(LIBNBD_CMD_FLAG_DF))
    public static let reqOne = NBDCommandFlags(rawValue: UInt32(LIBNBD_CMD_FLAG_REQ_ONE))
    public static let fastZero = NBDCommandFlags(rawValue: UInt32(LIBNBD_CMD_FLAG_FAST_ZERO))
}

/// Which of the server's advertised block sizes to ask for.
public enum NBDBlockSize: Int32, Sendable {
    case minimum = 0, preferred = 1, maximum = 2
}

/// The function libnbd calls when an asynchronous command completes:
/// `(userData, errorPointer) -> 1` (1 retires the command). `*errorPointer`
/// holds the command's errno, 0 on success. It runs with the handle's lock
/// held: it must not call into the same handle.
public typealias NBDCompletion = @convention(c) (UnsafeMutableRawPointer?, UnsafeMutablePointer<Int32>?) -> Int32

/// What `NBDHandle.setTLS` gives libnbd: a folder of certificates (libnbd's
/// layout: ca-cert.pem, and client-cert.pem with client-key.pem where the
/// server wants one), or a PSK file and the user to take from it.
public struct NBDTLSOptions: Sendable, Hashable {
    public var certificates: String?
    public var pskFile: String?
    public var username: String?
    /// Check the server's certificate against the CA (and its name against
    /// the host's, over TCP): libnbd's default.
    public var verifyPeer: Bool

    public init(certificates: String? = nil, pskFile: String? = nil, username: String? = nil, verifyPeer: Bool = true) {
        self.certificates = certificates
        self.pskFile = pskFile
        self.username = username
        self.verifyPeer = verifyPeer
    }
}

/// One libnbd handle: one NBD connection.
///
/// libnbd serialises calls on a handle with its own lock, so a handle may be
/// shared between threads.
public final class NBDHandle: @unchecked Sendable {
    private let handle: OpaquePointer
    var raw: OpaquePointer { handle }

    public init() throws(NBDError) {
        guard let h = nbd_create() else { throw NBDError.last() }
        handle = h
    }

    deinit { nbd_close(handle) }

    func check(_ rc: Int32) throws(NBDError) {
        if rc == -1 { throw NBDError.last() }
    }

    func flag(_ rc: Int32) throws(NBDError) -> Bool {
        try check(rc)
        return rc == 1
    }

    // MARK: Connecting

    /// Connects to `uri` (`nbd://host:port/name`, `nbd+unix:///name?socket=PATH`)
    /// and completes the handshake.
    public func connect(uri: String) throws(NBDError) {
        try check(nbd_connect_uri(handle, uri))
    }

    /// Starts connecting to `uri`: the connection and the handshake go on
    /// in `poll(milliseconds:)` while `isConnecting`.
    public func startConnecting(uri: String) throws(NBDError) {
        try check(nbd_aio_connect_uri(handle, uri))
    }

    /// Whether the connection or its handshake is still under way.
    public var isConnecting: Bool { nbd_aio_is_connecting(handle) == 1 }

    /// Waits up to `milliseconds` for the socket and moves the connection on;
    /// false when the time ran out first.
    @discardableResult
    public func poll(milliseconds: Int32) throws(NBDError) -> Bool {
        let rc = nbd_poll(handle, milliseconds)
        try check(rc)
        return rc == 1
    }

    /// The credentials a connection to an `nbds://` or `nbds+unix://` URI
    /// uses (a plaintext URI uses none), set before connecting. A URI's own
    /// `tls-certificates=` or `tls-psk-file=` wins over them; those name
    /// files, which libnbd allows only when told (the URIs here are the
    /// user's own, not a stranger's).
    public func setTLS(_ options: NBDTLSOptions) throws(NBDError) {
        if let certificates = options.certificates { try check(nbd_set_tls_certificates(handle, certificates)) }
        if let pskFile = options.pskFile { try check(nbd_set_tls_psk_file(handle, pskFile)) }
        if let username = options.username { try check(nbd_set_tls_username(handle, username)) }
        try check(nbd_set_tls_verify_peer(handle, options.verifyPeer))
        try check(nbd_set_uri_allow_local_file(handle, true))
    }

    /// Whether the connection runs TLS (after the handshake).
    public var tlsNegotiated: Bool { nbd_get_tls_negotiated(handle) == 1 }

    public func connect(unixSocket path: String, exportName: String = "") throws(NBDError) {
        try check(nbd_set_export_name(handle, exportName))
        try check(nbd_connect_unix(handle, path))
    }

    public func shutdown() {
        _ = nbd_shutdown(handle, 0)
    }

    // MARK: What the server offers

    public func size() throws(NBDError) -> UInt64 {
        let size = nbd_get_size(handle)
        if size < 0 { throw NBDError.last() }
        return UInt64(size)
    }

    public func blockSize(_ which: NBDBlockSize) throws(NBDError) -> Int64 {
        let value = nbd_get_block_size(handle, which.rawValue)
        if value < 0 { throw NBDError.last() }
        return value
    }

    public func isReadOnly() throws(NBDError) -> Bool { try flag(nbd_is_read_only(handle)) }
    public func canFlush() throws(NBDError) -> Bool { try flag(nbd_can_flush(handle)) }
    public func canFUA() throws(NBDError) -> Bool { try flag(nbd_can_fua(handle)) }
    public func canTrim() throws(NBDError) -> Bool { try flag(nbd_can_trim(handle)) }
    public func canZero() throws(NBDError) -> Bool { try flag(nbd_can_zero(handle)) }
    public func canFastZero() throws(NBDError) -> Bool { try flag(nbd_can_fast_zero(handle)) }
    public func canCache() throws(NBDError) -> Bool { try flag(nbd_can_cache(handle)) }
    public func canMultiConn() throws(NBDError) -> Bool { try flag(nbd_can_multi_conn(handle)) }

    // MARK: Synchronous commands

    public func pread(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64,
                      flags: NBDCommandFlags = []) throws(NBDError) {
        try check(nbd_pread(handle, buffer.baseAddress, buffer.count, offset, flags.rawValue))
    }

    public func pwrite(_ buffer: UnsafeRawBufferPointer, offset: UInt64,
                       flags: NBDCommandFlags = []) throws(NBDError) {
        try check(nbd_pwrite(handle, buffer.baseAddress, buffer.count, offset, flags.rawValue))
    }

    public func flush() throws(NBDError) { try check(nbd_flush(handle, 0)) }

    public func trim(count: UInt64, offset: UInt64, flags: NBDCommandFlags = []) throws(NBDError) {
        try check(nbd_trim(handle, count, offset, flags.rawValue))
    }

    public func zero(count: UInt64, offset: UInt64, flags: NBDCommandFlags = []) throws(NBDError) {
        try check(nbd_zero(handle, count, offset, flags.rawValue))
    }

    // MARK: Asynchronous commands
    //
    // Each returns once the command is queued; `completion` is called with
    // `userData` when the server has answered. The caller drives the socket
    // with `fileDescriptor`, `direction`, `notifyRead()` and `notifyWrite()`.

    public func aioPread(into buffer: UnsafeMutableRawPointer, count: Int, offset: UInt64,
                         userData: UnsafeMutableRawPointer, completion: NBDCompletion) throws(NBDError) {
        let cb = nbd_completion_callback(callback: completion, user_data: userData, free: nil)
        if nbd_aio_pread(handle, buffer, count, offset, cb, 0) < 0 { throw NBDError.last() }
    }

    public func aioPwrite(_ buffer: UnsafeRawPointer, count: Int, offset: UInt64, flags: NBDCommandFlags,
                          userData: UnsafeMutableRawPointer, completion: NBDCompletion) throws(NBDError) {
        let cb = nbd_completion_callback(callback: completion, user_data: userData, free: nil)
        if nbd_aio_pwrite(handle, buffer, count, offset, cb, flags.rawValue) < 0 { throw NBDError.last() }
    }

    public func aioFlush(userData: UnsafeMutableRawPointer, completion: NBDCompletion) throws(NBDError) {
        let cb = nbd_completion_callback(callback: completion, user_data: userData, free: nil)
        if nbd_aio_flush(handle, cb, 0) < 0 { throw NBDError.last() }
    }

    public func aioTrim(count: UInt64, offset: UInt64, flags: NBDCommandFlags,
                        userData: UnsafeMutableRawPointer, completion: NBDCompletion) throws(NBDError) {
        let cb = nbd_completion_callback(callback: completion, user_data: userData, free: nil)
        if nbd_aio_trim(handle, count, offset, cb, flags.rawValue) < 0 { throw NBDError.last() }
    }

    public func aioZero(count: UInt64, offset: UInt64, flags: NBDCommandFlags,
                        userData: UnsafeMutableRawPointer, completion: NBDCompletion) throws(NBDError) {
        let cb = nbd_completion_callback(callback: completion, user_data: userData, free: nil)
        if nbd_aio_zero(handle, count, offset, cb, flags.rawValue) < 0 { throw NBDError.last() }
    }

    /// The connection's socket, for poll(2).
    public var fileDescriptor: Int32 { nbd_aio_get_fd(handle) }

    /// Whether libnbd waits to read (`wantsRead`) and/or write (`wantsWrite`).
    public var direction: (wantsRead: Bool, wantsWrite: Bool) {
        let dir = nbd_aio_get_direction(handle)
        return (dir & UInt32(LIBNBD_AIO_DIRECTION_READ) != 0,
                dir & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0)
    }

    public func notifyRead() throws(NBDError) { try check(nbd_aio_notify_read(handle)) }
    public func notifyWrite() throws(NBDError) { try check(nbd_aio_notify_write(handle)) }

    /// Whether the connection has failed or been closed: no command can
    /// be sent on it any more.
    public var isDead: Bool { nbd_aio_is_dead(handle) == 1 || nbd_aio_is_closed(handle) == 1 }

    /// Commands queued or awaiting a reply.
    public var commandsInFlight: Int { Int(nbd_aio_in_flight(handle)) }
}
