import Glibc

/// `count` bytes aligned to `alignment` (a page at least, what O_DIRECT
/// needs), zero-filled if asked; give them back with `free`. Running out of
/// memory here is fatal, as everywhere else in Swift.
public func allocateAligned(_ count: Int, alignment: Int = pageSize, zeroed: Bool = false) -> UnsafeMutableRawBufferPointer {
    var memory: UnsafeMutableRawPointer? = nil
    precondition(posix_memalign(&memory, max(alignment, pageSize), max(count, 1)) == 0,
                 "out of memory: \(count) aligned bytes")
    if zeroed { memset(memory!, 0, count) }
    return UnsafeMutableRawBufferPointer(start: memory, count: count)
}

/// Page-aligned bytes, zero-filled, freed with the object: buffers for
/// metadata and copies on legs that may be opened with O_DIRECT.
public final class AlignedBytes: @unchecked Sendable {
    public let bytes: UnsafeMutableRawBufferPointer

    public init(count: Int) {
        bytes = allocateAligned(count, zeroed: true)
    }

    public convenience init(_ contents: [UInt8]) {
        self.init(count: contents.count)
        contents.withUnsafeBytes { bytes.copyMemory(from: $0) }
    }

    deinit { free(bytes.baseAddress) }
}
