import Glibc

/// How to open a device.
public struct DeviceOptions: Sendable, Hashable {
    /// Open for reading only; writes, discards and zeroing are refused.
    public var readOnly = false
    /// Bypass the page cache (O_DIRECT) for files and block devices. Regions
    /// must then be aligned to the device's block size; memory need not be
    /// (unaligned memory goes through an aligned bounce buffer).
    public var direct = false
    /// Create a missing regular file, sparse, of this many bytes.
    public var createSize: UInt64?
    /// Claim a block device for this process alone (O_EXCL), as md and dm
    /// claim their legs: refused while anything else uses it, and nothing
    /// else (a mount, mkfs, another server) can take it while it is open.
    /// Off to look at a device that is in use (`dmio-nbd examine`).
    public var exclusive = true
    /// How long a remote device may stay silent, while connecting or while
    /// it owes replies, before it is given up: its requests then fail with
    /// ETIMEDOUT. nil waits for ever (until TCP itself gives up).
    public var remoteTimeout: Duration?

    /// 30 seconds, the SCSI layer's default command timeout: a mirror whose
    /// remote leg hangs goes on without it after this long.
    public static let defaultRemoteTimeout = Duration.seconds(30)

    public init(readOnly: Bool = false, direct: Bool = false, createSize: UInt64? = nil, exclusive: Bool = true,
                remoteTimeout: Duration? = defaultRemoteTimeout) {
        self.readOnly = readOnly
        self.direct = direct
        self.createSize = createSize
        self.exclusive = exclusive
        self.remoteTimeout = remoteTimeout
    }
}

/// What kind of device a `BlockDevice` is.
public enum DeviceKind: Sendable, Hashable, CustomStringConvertible {
    case file, blockDevice, remote

    public var description: String {
        switch self {
        case .file: "file"
        case .blockDevice: "block device"
        case .remote: "NBD export"
        }
    }
}

/// A device that regions point at: a regular file, a block device, or a
/// remote NBD export. Open one with `BlockDevice.open(_:options:)`.
public class BlockDevice: @unchecked Sendable, CustomStringConvertible {
    /// The path or URI the device was opened by.
    public let name: String
    public let kind: DeviceKind
    /// Usable size in bytes (a whole number of sectors).
    public let size: UInt64
    /// Regions must start and end on multiples of this many bytes.
    public let blockSize: Int
    public let isReadOnly: Bool
    /// Memory segments must be aligned to this for the device to use them
    /// directly (1 unless O_DIRECT).
    let memoryAlignment: Int
    /// The file descriptor the engines do I/O on; -1 for remote devices.
    let fileDescriptor: Int32
    /// Whether this open made the file (`createSize`): only what was made
    /// may be removed when what it was made for fails.
    public internal(set) var wasCreated = false

    public var sectors: UInt64 { size >> sectorShift }
    public var description: String { name }

    init(name: String, kind: DeviceKind, size: UInt64, blockSize: Int, isReadOnly: Bool,
         memoryAlignment: Int, fileDescriptor: Int32) {
        self.name = name
        self.kind = kind
        self.size = size & ~UInt64(sectorSize - 1)
        self.blockSize = blockSize
        self.isReadOnly = isReadOnly
        self.memoryAlignment = memoryAlignment
        self.fileDescriptor = fileDescriptor
    }

    /// Opens `spec`: a path to a regular file or a block device, or an NBD
    /// URI (`nbd://host[:port]/name`, `nbd+unix:///name?socket=PATH`).
    public static func open(_ spec: String, options: DeviceOptions = DeviceOptions()) throws(DMIOError) -> BlockDevice {
        if spec.hasPrefix("nbd://") || spec.hasPrefix("nbd+unix://") || spec.hasPrefix("nbds://") {
            return try RemoteNBDDevice(uri: spec, options: options)
        }
        if spec.contains("://") { throw .invalidDeviceSpec(spec) }
        return try LocalDevice(path: spec, options: options)
    }

    // MARK: What subclasses decide

    /// The command that carries out `operation` on this device.
    func command(for operation: IOOperation, flags: IOFlags) -> Bio.Command {
        fatalError("subclass")
    }

    /// The device's data lives in memory (a file on tmpfs): changing it is a
    /// copy into the page cache that never waits for storage.
    var isInMemory: Bool { false }

    /// Whether write-zeroes that may unmap is cheap here (a hole punched in
    /// a file, a block device's own write-zeroes command, an NBD server's
    /// WRITE_ZEROES) rather than a write of zeroes from memory. A discard
    /// promises nothing about what the range reads afterwards (NBD's trim,
    /// BLKDISCARD, a server that ignores it): a mirror trims its legs with
    /// write-zeroes instead, so that they read the same, and offers trim
    /// only where every leg zeroes cheaply.
    public var zeroesCheaply: Bool { true }

    /// Called when fallocate with `mode` cannot zero here; later requests
    /// write zeroes instead.
    func fallocateRefused(mode: Int32) {}

    /// Issues `bio`: local devices add it to the engine's batch, remote ones
    /// send it themselves.
    func issue(_ bio: Bio, batch: inout BioBatch) {
        batch.append(bio)
    }
}

/// A singly linked list of bios, handed to an engine in one call.
struct BioBatch {
    private(set) var head: Bio?
    private var tail: Bio?

    var isEmpty: Bool { head == nil }

    mutating func append(_ bio: Bio) {
        bio.next = nil
        if let tail { tail.next = bio } else { head = bio }
        tail = bio
    }

    mutating func append(contentsOf other: BioBatch) {
        guard let otherHead = other.head else { return }
        if let tail { tail.next = otherHead } else { head = otherHead }
        tail = other.tail
    }

    /// Takes the bios that `belongsOut` picks out of the batch, in order.
    mutating func remove(where belongsOut: (Bio) -> Bool) -> BioBatch {
        var taken = BioBatch()
        var rest = BioBatch()
        while let bio = popFirst() {
            if belongsOut(bio) { taken.append(bio) } else { rest.append(bio) }
        }
        self = rest
        return taken
    }

    mutating func popFirst() -> Bio? {
        guard let first = head else { return nil }
        head = first.next
        if head == nil { tail = nil }
        first.next = nil
        return first
    }
}
