import DMIO

/// Where a mirror keeps its metadata on each leg. Every leg starts with the
/// same reserved area: two superblock slots, then the write-intent bitmap;
/// the mirrored data follows, aligned to a MiB. Like md's v1.2 superblock,
/// each leg carries the whole mirror's view, so a leg knows which mirror it
/// belongs to, and a leg that missed updates shows a lower event count.
public struct MirrorLayout: Sendable, Hashable {
    public static let slotBytes = 4096
    public static let bitmapOffset: UInt64 = 2 * UInt64(slotBytes)
    static let dataAlignment: UInt64 = 1 << 20
    public static let defaultRegionBytes: UInt32 = 512 << 10

    /// Bytes of every leg (legs of other sizes are refused).
    public let legBytes: UInt64
    public let regionBytes: UInt32
    /// Where the mirrored data starts on each leg, and how much there is.
    public let dataOffset: UInt64
    public let dataBytes: UInt64
    public let bitmapBytes: UInt64

    public var regionCount: Int { Int((dataBytes + UInt64(regionBytes) - 1) / UInt64(regionBytes)) }

    public init(legBytes: UInt64, regionBytes: UInt32 = defaultRegionBytes) throws(MirrorError) {
        guard regionBytes >= 4096, regionBytes & (regionBytes - 1) == 0 else {
            throw .invalidRegionSize(regionBytes)
        }
        // No device is this large; a superblock that says so is damaged (or
        // hostile: a remote leg's server writes it), and the sums below
        // would overflow (found by fuzz-metadata).
        guard legBytes <= UInt64.max / 2 else { throw .corruptMetadata("a leg of \(legBytes) bytes") }
        // A bitmap sized for the whole leg is a little larger than needed.
        let regionsAtMost = (legBytes + UInt64(regionBytes) - 1) / UInt64(regionBytes)
        let bitmapBytes = roundUp((regionsAtMost + 7) / 8, to: UInt64(Self.slotBytes))
        let dataOffset = roundUp(Self.bitmapOffset + bitmapBytes, to: Self.dataAlignment)
        guard legBytes >= dataOffset + UInt64(regionBytes) else {
            throw .legTooSmall(bytes: legBytes, needed: dataOffset + UInt64(regionBytes))
        }
        self.legBytes = legBytes
        self.regionBytes = regionBytes
        self.bitmapBytes = bitmapBytes
        self.dataOffset = dataOffset
        self.dataBytes = (legBytes - dataOffset) & ~UInt64(Self.slotBytes - 1)
    }

    init(validating superblock: Superblock) throws(MirrorError) {
        try self.init(legBytes: superblock.legBytes, regionBytes: superblock.regionBytes)
        guard dataOffset == superblock.dataOffset, dataBytes == superblock.dataBytes else {
            throw .corruptMetadata("data area \(superblock.dataOffset)+\(superblock.dataBytes) does not match its leg size")
        }
    }

    /// Byte offset of superblock slot `slot` (0 or 1).
    static func slotOffset(_ slot: Int) -> UInt64 { UInt64(slot * slotBytes) }
}

func roundUp(_ value: UInt64, to multiple: UInt64) -> UInt64 {
    (value + multiple - 1) / multiple * multiple
}

extension MirrorLayout {
    /// Bytes `offset..<offset+length` of the mirrored data, on `device` (a leg).
    func dataRegion(on device: BlockDevice, offset: UInt64, length: UInt64) -> IORegion {
        IORegion(device: device, sector: (dataOffset + offset) >> 9, count: length >> 9)
    }
}
