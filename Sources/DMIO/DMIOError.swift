import Glibc

/// A request or a device that DMIO refused. Each names the device and the
/// cause. A refused request wrote nothing to any region.
public enum DMIOError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The device could not be opened (no such file, permission, not a file
    /// or block device...).
    case openFailed(device: String, errno: Int32)
    /// A block device that something else uses (EBUSY to an exclusive
    /// open): `holder` says what, where it can be told.
    case busy(device: String, holder: String?)
    /// A remote NBD export could not be reached or refused the connection.
    case remoteFailed(device: String, message: String)
    /// A device spec that names a scheme no driver takes (`DeviceSpec`).
    case invalidDeviceSpec(String)
    /// A device spec whose parameter of dmio's own (`connections=N` in a
    /// URI) has a value it cannot take, and why.
    case invalidDeviceParameter(device: String, why: String)
    /// A write-class request to a device opened read-only.
    case readOnlyDevice(device: String, operation: IOOperation)
    /// The region reaches past the end of its device.
    case beyondEnd(device: String, sector: UInt64, count: UInt64, deviceSectors: UInt64)
    /// A region that the device's block size (O_DIRECT, 4Kn disks, NBD minimum
    /// block size) cannot address.
    case misaligned(device: String, sector: UInt64, count: UInt64, blockSize: Int)
    /// A read with other than one region, or a write with 0 or more than 64.
    case invalidRegionCount(operation: IOOperation, count: Int)
    /// The memory is shorter than the longest region.
    case memoryTooSmall(neededBytes: UInt64, availableBytes: UInt64)
    /// A read or a write without memory.
    case memoryMissing(operation: IOOperation)
    /// A page-list offset outside the first page, or a bio vector outside its page.
    case invalidMemory(String)
    /// The requested I/O engine cannot run here.
    case engineUnavailable(engine: IOEngineKind, errno: Int32)

    private static let usedBySystem =
        "by the system: mounted, part of an md array or a device-mapper device, or claimed by another program"

    public var description: String {
        switch self {
        case .openFailed(let device, let errno):
            "\(device): \(errnoDescription(errno))"
        case .busy(let device, let holder):
            "\(device) is in use (\(holder ?? Self.usedBySystem)): a device can serve one purpose at a time"
        case .remoteFailed(let device, let message):
            "\(device): \(message)"
        case .invalidDeviceSpec(let spec):
            "\(spec): not a file, a block device, or an nbd://, nbds://, nbd+unix:// or nbds+unix:// URI"
        case .invalidDeviceParameter(let device, let why):
            "\(device): \(why)"
        case .readOnlyDevice(let device, let operation):
            "\(device): read-only device, \(operation) refused"
        case .beyondEnd(let device, let sector, let count, let deviceSectors):
            "\(device): sectors \(sector)+\(count) reach past the device's end (\(deviceSectors) sectors)"
        case .misaligned(let device, let sector, let count, let blockSize):
            "\(device): sectors \(sector)+\(count) are not aligned to its \(blockSize)-byte blocks"
        case .invalidRegionCount(let operation, let count):
            operation == .read
                ? "read takes exactly one region, got \(count)"
                : "\(operation) takes 1 to 64 regions, got \(count)"
        case .memoryTooSmall(let needed, let available):
            "memory holds \(available) bytes, the regions need \(needed)"
        case .memoryMissing(let operation):
            "\(operation) needs memory to transfer"
        case .invalidMemory(let why):
            "invalid memory: \(why)"
        case .engineUnavailable(let engine, let errno):
            "I/O engine \(engine) unavailable: \(errnoDescription(errno))"
        }
    }
}

/// "No space left on device (ENOSPC)" for an errno.
public func errnoDescription(_ code: Int32) -> String {
    let text = String(cString: strerror(code))
    if let name = errnoNames[code] { return "\(text) (\(name))" }
    return text
}

/// "ENOSPC" for an errno (its number where it has no name here).
public func errnoName(_ code: Int32) -> String { errnoNames[code] ?? "errno \(code)" }

private let errnoNames: [Int32: String] = [
    EPERM: "EPERM", ENOENT: "ENOENT", EIO: "EIO", ENXIO: "ENXIO", EBADF: "EBADF",
    EAGAIN: "EAGAIN", ENOMEM: "ENOMEM", EACCES: "EACCES", EBUSY: "EBUSY",
    EEXIST: "EEXIST", ENODEV: "ENODEV", ENOTDIR: "ENOTDIR", EISDIR: "EISDIR",
    EINVAL: "EINVAL", EFBIG: "EFBIG", ENOSPC: "ENOSPC", EROFS: "EROFS",
    ENOSYS: "ENOSYS", EOPNOTSUPP: "EOPNOTSUPP", ESHUTDOWN: "ESHUTDOWN",
    ECONNREFUSED: "ECONNREFUSED", ECONNRESET: "ECONNRESET", EPIPE: "EPIPE",
    ENOTCONN: "ENOTCONN", EDQUOT: "EDQUOT", ETIMEDOUT: "ETIMEDOUT",
]
