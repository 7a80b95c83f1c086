import CDMIOSupport
import Glibc

/// A stretch of a device: data, or a hole that reads as zeroes.
public struct DeviceExtent: Sendable, Hashable {
    public var length: UInt64
    public var isHole: Bool

    public init(length: UInt64, isHole: Bool) {
        self.length = length
        self.isHole = isHole
    }
}

extension LocalDevice {
    /// Sparse files tell by SEEK_DATA and SEEK_HOLE; a block device holds
    /// data everywhere, as far as anyone can tell.
    func allocation(offset: UInt64, length: UInt64, maxExtents: Int) throws(DMIOError) -> [DeviceExtent] {
        guard !isBlockDevice else { return [DeviceExtent(length: length, isHole: false)] }
        return try sparseAllocation(offset: offset, length: length, maxExtents: maxExtents)
    }

    /// Cheap: one SEEK_DATA, which on tmpfs and most file systems answers
    /// at once from a data position, where SEEK_HOLE would walk the data
    /// page by page.
    func isHole(offset: UInt64, length: UInt64) -> Bool {
        guard !isBlockDevice else { return false }
        let data = dmio_seek_data(fileDescriptor, Int64(offset))
        if data < 0 { return errno == ENXIO }
        return UInt64(data) >= offset + length
    }

    private func sparseAllocation(offset: UInt64, length: UInt64, maxExtents: Int) throws(DMIOError) -> [DeviceExtent] {
        var extents: [DeviceExtent] = []
        let end = offset + length
        var position = offset
        func add(_ bytes: UInt64, hole: Bool) {
            if let last = extents.last, last.isHole == hole {
                extents[extents.count - 1].length += bytes
            } else {
                extents.append(DeviceExtent(length: bytes, isHole: hole))
            }
            position += bytes
        }
        while position < end && extents.count <= maxExtents {
            let data = dmio_seek_data(fileDescriptor, Int64(position))
            if data < 0 {
                guard errno == ENXIO else { throw .openFailed(device: name, errno: errno) }
                add(end - position, hole: true)  // no data from here to the end of the file
                break
            }
            if UInt64(data) > position {
                add(min(UInt64(data), end) - position, hole: true)
                continue
            }
            let hole = dmio_seek_hole(fileDescriptor, Int64(position))
            guard hole >= 0 else { throw .openFailed(device: name, errno: errno) }
            add(min(UInt64(hole), end) - position, hole: false)
        }
        // Merging may have let one extent too many in; the caller asked for
        // at most maxExtents, and the last one may end early.
        return Array(extents.prefix(maxExtents))
    }
}
