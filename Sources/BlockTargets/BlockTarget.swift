import DMIO
import Glibc

/// The block sizes an export advertises (NBD_INFO_BLOCK_SIZE).
public struct BlockSizes: Sendable, Hashable {
    /// Requests must be aligned to this (a power of two, 1 to 65536).
    public var minimum: UInt32
    /// Requests aligned to this avoid read-modify-write.
    public var preferred: UInt32
    /// The largest read or write payload.
    public var maximumPayload: UInt32

    public init(minimum: UInt32, preferred: UInt32, maximumPayload: UInt32) {
        self.minimum = minimum
        self.preferred = preferred
        self.maximumPayload = maximumPayload
    }
}

/// What a target supports beyond reads and writes.
public struct TargetCapabilities: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let readOnly = TargetCapabilities(rawValue: 1 << 0)
    public static let flush = TargetCapabilities(rawValue: 1 << 1)
    public static let fua = TargetCapabilities(rawValue: 1 << 2)
    public static let trim = TargetCapabilities(rawValue: 1 << 3)
    public static let writeZeroes = TargetCapabilities(rawValue: 1 << 4)
    /// Zeroing that may unmap is faster than writing zeroes (fast-zero
    /// requests without NO_HOLE succeed; with NO_HOLE they get ENOTSUP).
    public static let fastZero = TargetCapabilities(rawValue: 1 << 5)
    public static let cache = TargetCapabilities(rawValue: 1 << 6)
    /// Every connection sees the same data at once: no per-connection cache.
    public static let multiConnection = TargetCapabilities(rawValue: 1 << 7)
}

/// How a target request ended: success, or an errno and words a person can
/// read (which the server sends in a structured error reply). Thrown by
/// `allocation` when it fails.
public struct TargetResult: Error, Sendable, Hashable {
    public var errno: Int32
    public var message: String?

    public static let success = TargetResult(errno: 0, message: nil)

    public init(errno: Int32, message: String? = nil) {
        self.errno = errno
        self.message = message
    }

    public var succeeded: Bool { errno == 0 }
}

/// One extent of block status: `length` bytes with `flags` of a meta context.
public struct Extent: Sendable, Hashable {
    public var length: UInt32
    public var flags: UInt32

    public init(length: UInt32, flags: UInt32) {
        self.length = length
        self.flags = flags
    }

    /// base:allocation flags.
    public static let hole: UInt32 = 1 << 0
    public static let zero: UInt32 = 1 << 1
}

/// Called once when a target request ends. It may run on any thread.
public typealias TargetCompletion = @Sendable (TargetResult) -> Void

/// What the NBD server serves: a device of `size` bytes. The server checks
/// every request against `size`, `blockSizes` and `capabilities` before it
/// calls the target, so a target sees only requests it can carry out.
///
/// Every request that does I/O carries the `IOContext` it runs in. The
/// memory passed to `read` and `write` stays valid until `completion`. A
/// write's data is one buffer, or bio vectors when it arrived in pieces.
///
/// There are no default implementations: a target, or a wrapper that stacks
/// over one (as nbdkit's filters over plugins), says what it does with each.
public protocol BlockTarget: AnyObject, Sendable {
    var size: UInt64 { get }
    var blockSizes: BlockSizes { get }
    var capabilities: TargetCapabilities { get }

    func read(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64, context: IOContext,
              completion: @escaping TargetCompletion)
    func write(_ data: IOMemory, offset: UInt64, fua: Bool, context: IOContext,
               completion: @escaping TargetCompletion)
    func flush(context: IOContext, completion: @escaping TargetCompletion)
    func trim(offset: UInt64, length: UInt64, fua: Bool, context: IOContext,
              completion: @escaping TargetCompletion)
    func writeZeroes(offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool, context: IOContext,
                     completion: @escaping TargetCompletion)
    func cache(offset: UInt64, length: UInt64, context: IOContext, completion: @escaping TargetCompletion)
    /// base:allocation extents from `offset`, covering at most `length`
    /// bytes (at least one extent).
    func allocation(offset: UInt64, length: UInt64, maxExtents: Int) throws -> [Extent]
    /// Meta contexts of the target's own (e.g. "dmio:health"), offered
    /// besides base:allocation; none for most targets.
    var metaContexts: [String] { get }
    /// Extents of one of `metaContexts` from `offset`, covering at most
    /// `length` bytes (at least one extent).
    func blockStatus(context: String, offset: UInt64, length: UInt64, maxExtents: Int) throws -> [Extent]
    /// Whether the range certainly reads as zeroes, found out cheaply (a
    /// large read of it is then answered as a hole without reading).
    func readsAsZeroes(offset: UInt64, length: UInt64) -> Bool

    /// Around the requests of one socket read, on the connection's thread:
    /// a target may hold their I/O back until `endBatch` and start it in
    /// one go (DMIO's plug).
    func beginBatch(context: IOContext)
    func endBatch(context: IOContext)
}

extension TargetResult {
    /// The answer to block status for a meta context the target lacks.
    public static func noMetaContext(_ context: String) -> TargetResult {
        TargetResult(errno: EINVAL, message: "no meta context \(context)")
    }
}
