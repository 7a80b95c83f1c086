/// The size of a sector, in bytes: `sector` and `count` of an `IORegion` are
/// in these units, as in the kernel.
public let sectorSize = 512
let sectorShift: UInt64 = 9

/// `struct io_region`: a device, a starting sector and a number of sectors.
///
/// A region with `count == 0` is skipped by reads and writes (as the kernel
/// does); a flush ignores `sector` and `count` and flushes the device.
public struct IORegion {
    public var device: BlockDevice
    public var sector: UInt64
    public var count: UInt64

    public init(device: BlockDevice, sector: UInt64, count: UInt64) {
        self.device = device
        self.sector = sector
        self.count = count
    }

    /// The region's first byte on the device.
    public var byteOffset: UInt64 { sector << sectorShift }
    /// The region's length in bytes.
    public var byteCount: UInt64 { count << sectorShift }
}

extension UnsafeBufferPointer where Element == IORegion {
    /// Runs `body` with the device of region `index`, lent without a
    /// reference of its own (the region holds one). A request reads every
    /// region's device: taking a region out of the buffer, or its device,
    /// would count a reference each time, so the device is read in place,
    /// as the bit pattern it is.
    @inline(__always)
    func withDevice<Result>(at index: Int, _ body: (BlockDevice) -> Result) -> Result {
        assert(indices.contains(index), "region \(index) of \(count)")
        return (UnsafeRawPointer(baseAddress! + index) + IORegion.deviceOffset)
            .load(as: Unmanaged<BlockDevice>.self)._withUnsafeGuaranteedRef(body)
    }
}

extension IORegion {
    /// Typed: were `device` ever not a strong reference to a final class,
    /// this would not build, rather than read the wrong bits.
    fileprivate static let deviceOffset =
        MemoryLayout<IORegion>.offset(of: \IORegion.device as WritableKeyPath<IORegion, BlockDevice>)!
}
