import DMIO
import Glibc

// What every target over DMIO devices says and does the same way.

extension BlockSizes {
    /// A target over devices that need I/O aligned to `deviceBlockSize`:
    /// that (a sector at least), 4 KiB preferred, 32 MiB payloads.
    public static func over(deviceBlockSize: Int) -> BlockSizes {
        let minimum = UInt32(max(sectorSize, deviceBlockSize))
        return BlockSizes(minimum: minimum, preferred: max(minimum, 4096), maximumPayload: 32 << 20)
    }
}

extension IOFlags {
    public static func write(fua: Bool) -> IOFlags { fua ? .fua : [] }

    /// NBD_CMD_WRITE_ZEROES: may it unmap (NBD_CMD_FLAG_NO_HOLE clear), FUA.
    public static func zeroing(mayUnmap: Bool, fua: Bool) -> IOFlags {
        var flags: IOFlags = mayUnmap ? [] : .noUnmap
        if fua { flags.insert(.fua) }
        return flags
    }
}

extension BlockDevice {
    /// base:allocation extents of the device from byte `offset`: a hole
    /// reads as zeroes.
    public func extents(offset: UInt64, length: UInt64, maxExtents: Int) throws(TargetResult) -> [Extent] {
        do {
            return try allocation(offset: offset, length: length, maxExtents: maxExtents)
                .map { Extent(length: UInt32($0.length), flags: $0.isHole ? Extent.hole | Extent.zero : 0) }
        } catch {
            throw TargetResult(errno: EIO, message: "\(error)")
        }
    }
}

extension TargetResult {
    /// A DMIO result of one region on `device`.
    public init(_ result: IOResult, device: BlockDevice) {
        if let failure = result.failures.first {
            self.init(errno: failure.errno, message: "\(device.name): \(errnoDescription(failure.errno))")
        } else {
            self = .success
        }
    }
}
