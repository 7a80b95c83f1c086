import Glibc
import LibNBD

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
    /// The TLS credentials of remote devices named by `nbds` URIs.
    public var remoteTLS: NBDTLSOptions
    /// How many connections a remote device's commands go on, where its
    /// server offers multi-conn (else one, whatever is asked). nil:
    /// `defaultRemoteConnections` with multi-conn, else one. A device URI's
    /// `connections=N` wins over it (`DeviceSpec`).
    public var remoteConnections: Int?
    /// Count every bio the device is given (`BlockDevice.statistics`): two
    /// clock reads and a few atomic adds each, for the metrics.
    public var countsRequests = false

    /// 30 seconds, the SCSI layer's default command timeout: a mirror whose
    /// remote leg hangs goes on without it after this long.
    public static let defaultRemoteTimeout = Duration.seconds(30)
    /// The connections of a remote device whose server offers multi-conn,
    /// unless told otherwise: nbdcopy's default.
    public static let defaultRemoteConnections = 4
    /// The connections a remote device may be given.
    public static let remoteConnectionRange = 1...16

    public init(readOnly: Bool = false, direct: Bool = false, createSize: UInt64? = nil, exclusive: Bool = true,
                remoteTimeout: Duration? = defaultRemoteTimeout, remoteTLS: NBDTLSOptions = NBDTLSOptions(),
                remoteConnections: Int? = nil) {
        self.readOnly = readOnly
        self.direct = direct
        self.createSize = createSize
        self.exclusive = exclusive
        self.remoteTimeout = remoteTimeout
        self.remoteTLS = remoteTLS
        self.remoteConnections = remoteConnections
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

/// A kind of device, as DMIO uses it: operations in the terms a request
/// names them (read, write, flush, discard, write-zeroes that may unmap or
/// not, FUA), and each driver chooses its own system calls or commands. One
/// file per driver (LocalDevice, RemoteNBDDevice), opened by its scheme
/// (`DeviceSpec`).
protocol DeviceDriver: AnyObject, Sendable {
    var kind: DeviceKind { get }
    /// Usable size in bytes.
    var size: UInt64 { get }
    /// Regions must start and end on multiples of this many bytes.
    var blockSize: Int { get }
    var isReadOnly: Bool { get }
    /// Memory segments must be aligned to this for the driver to use them
    /// directly (1 unless O_DIRECT).
    var memoryAlignment: Int { get }
    /// Whether this open made the device (a file of `createSize`).
    var wasCreated: Bool { get }
    /// See `BlockDevice.zeroesCheaply`.
    var zeroesCheaply: Bool { get }
    /// The data lives in memory (a file on tmpfs): changing it is a copy
    /// into the page cache that never waits for storage.
    var isInMemory: Bool { get }
    /// See `BlockDevice.connectionCount`.
    var connectionCount: Int? { get }
    /// See `BlockDevice.openWarning`.
    var openWarning: String? { get }

    /// Starts `bio`: a driver on a local file descriptor chooses the system
    /// call and adds the bio to the engine's `batch`; one that does its own
    /// I/O (a remote connection) sends it.
    func issue(_ bio: Bio, batch: inout BioBatch)
    /// See `BlockDevice.allocation`.
    func allocation(offset: UInt64, length: UInt64, maxExtents: Int) throws(DMIOError) -> [DeviceExtent]
    /// See `BlockDevice.isHole`.
    func isHole(offset: UInt64, length: UInt64) -> Bool
}

/// A device that regions point at: a regular file, a block device, or a
/// remote NBD export, whichever driver serves it. Open one with
/// `BlockDevice.open(_:options:)`.
public final class BlockDevice: @unchecked Sendable, CustomStringConvertible {
    /// The path or URI the device was opened by.
    public let name: String
    public let kind: DeviceKind
    /// Usable size in bytes (a whole number of sectors).
    public let size: UInt64
    /// Regions must start and end on multiples of this many bytes.
    public let blockSize: Int
    public let isReadOnly: Bool
    /// Whether this open made the file (`createSize`): only what was made
    /// may be removed when what it was made for fails.
    public let wasCreated: Bool
    /// How many connections a remote device's commands go on; nil for a
    /// local device.
    public let connectionCount: Int?
    /// What the open could not do as asked (fewer connections), for the
    /// caller to log: DMIO logs nothing.
    public let openWarning: String?
    let memoryAlignment: Int
    /// See `DeviceDriver.isInMemory`.
    let isInMemory: Bool
    let driver: any DeviceDriver
    /// What the device's bios did, by `IOOperation`, when `DeviceOptions.countsRequests`.
    public let statistics: RequestStatistics?
    /// Where its bios count (the device keeps `statistics` while they do).
    let recorder: RequestStatistics.Recorder?

    public var sectors: UInt64 { size >> sectorShift }
    public var description: String { name }

    private init(name: String, driver: any DeviceDriver, countsRequests: Bool) {
        self.name = name
        self.driver = driver
        statistics = countsRequests
            ? RequestStatistics(operations: IOOperation.allCases.map(\.metricName), countsSizes: false) : nil
        recorder = statistics?.recorder
        kind = driver.kind
        size = driver.size & ~UInt64(sectorSize - 1)
        blockSize = driver.blockSize
        isReadOnly = driver.isReadOnly
        wasCreated = driver.wasCreated
        connectionCount = driver.connectionCount
        openWarning = driver.openWarning
        memoryAlignment = driver.memoryAlignment
        isInMemory = driver.isInMemory
    }

    /// Opens `spec`: a path to a regular file or a block device, or an NBD
    /// URI (`nbd://host[:port]/name`, `nbd+unix:///name?socket=PATH`, and
    /// their `nbds` forms with TLS).
    public static func open(_ spec: String, options: DeviceOptions = DeviceOptions()) throws(DMIOError) -> BlockDevice {
        BlockDevice(name: spec, driver: try DeviceSpec(spec).open(options: options), countsRequests: options.countsRequests)
    }

    /// Whether write-zeroes that may unmap is cheap here (a hole punched in
    /// a file, a block device's own write-zeroes command, an NBD server's
    /// WRITE_ZEROES) rather than a write of zeroes from memory. A discard
    /// promises nothing about what the range reads afterwards (NBD's trim,
    /// BLKDISCARD, a server that ignores it): a mirror trims its legs with
    /// write-zeroes instead, so that they read the same, and offers trim
    /// only where every leg zeroes cheaply.
    public var zeroesCheaply: Bool { driver.zeroesCheaply }

    func issue(_ bio: Bio, batch: inout BioBatch) { driver.issue(bio, batch: &batch) }

    /// Which parts of `length` bytes at `offset` hold data and which are
    /// holes, in order, at most `maxExtents` of them (the last may end
    /// before `offset + length`). Sparse files tell by SEEK_DATA and
    /// SEEK_HOLE; other devices report data, which is always true.
    public func allocation(offset: UInt64, length: UInt64, maxExtents: Int) throws(DMIOError) -> [DeviceExtent] {
        try driver.allocation(offset: offset, length: length, maxExtents: maxExtents)
    }

    /// Whether `length` bytes at `offset` are one hole, so read as zeroes
    /// without holding data; false when it cannot tell cheaply.
    public func isHole(offset: UInt64, length: UInt64) -> Bool {
        driver.isHole(offset: offset, length: length)
    }
}

/// A singly linked list of bios, handed to an engine in one call. Its
/// links are unmanaged: a bio's pool keeps it (`ObjectPool`), so a bio
/// going from batch to batch costs no reference counting.
struct BioBatch {
    private var head: Unmanaged<Bio>?
    private var tail: Unmanaged<Bio>?

    var isEmpty: Bool { head == nil }

    mutating func append(_ bio: Bio) {
        let link = Unmanaged.passUnretained(bio)
        bio.next = nil
        if let tail { tail._withUnsafeGuaranteedRef { $0.next = link } } else { head = link }
        tail = link
    }

    mutating func append(contentsOf other: BioBatch) {
        guard let otherHead = other.head else { return }
        if let tail { tail._withUnsafeGuaranteedRef { $0.next = otherHead } } else { head = otherHead }
        tail = other.tail
    }

    /// Takes the bios that `belongsOut` picks out of the batch, in order.
    mutating func remove(where belongsOut: (Bio) -> Bool) -> BioBatch {
        var taken = BioBatch()
        var rest = BioBatch()
        while let link = popFirstLink() {
            link._withUnsafeGuaranteedRef { bio in
                if belongsOut(bio) { taken.append(bio) } else { rest.append(bio) }
            }
        }
        self = rest
        return taken
    }

    mutating func popFirst() -> Bio? {
        popFirstLink()?.takeUnretainedValue()
    }

    /// Takes the first bio, unmanaged: its pool keeps it. Use it through
    /// `_withUnsafeGuaranteedRef` to pay no reference counting.
    mutating func popFirstLink() -> Unmanaged<Bio>? {
        guard let first = head else { return nil }
        first._withUnsafeGuaranteedRef { bio in
            head = bio.next
            bio.next = nil
        }
        if head == nil { tail = nil }
        return first
    }
}
