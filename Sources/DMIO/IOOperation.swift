/// What a request does: the kernel's `REQ_OP_*` as dm-io passes them on.
public enum IOOperation: Int, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// `REQ_OP_READ` from exactly one region.
    case read
    /// `REQ_OP_WRITE` to one or more regions, each getting the same data.
    case write
    /// `REQ_OP_DISCARD`: the regions' contents become undefined; files punch
    /// a hole, block devices get BLKDISCARD, NBD exports get NBD_CMD_TRIM.
    case discard
    /// `REQ_OP_WRITE_ZEROES`: the regions read back as zeroes. The device may
    /// unmap the blocks unless the request carries `IOFlags.noUnmap`.
    case writeZeroes
    /// An empty write with `REQ_PREFLUSH`: every region's device makes its
    /// completed writes durable. Regions with `count == 0` are flushed too.
    case flush

    public var description: String {
        switch self {
        case .read: "read"
        case .write: "write"
        case .discard: "discard"
        case .writeZeroes: "write-zeroes"
        case .flush: "flush"
        }
    }

    /// The name metrics label the operation with.
    public var metricName: String { self == .writeZeroes ? "write_zeroes" : description }

    var writesDevice: Bool { self != .read }
    var carriesData: Bool { self == .read || self == .write }
}

/// Request flags, as the kernel's `REQ_*` modifiers.
public struct IOFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// `REQ_FUA`: the write is durable when it completes.
    public static let fua = IOFlags(rawValue: 1 << 0)
    /// `REQ_NOUNMAP`: write-zeroes must keep the blocks allocated.
    public static let noUnmap = IOFlags(rawValue: 1 << 1)
}
