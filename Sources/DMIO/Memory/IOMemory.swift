/// The memory of a read or a write: one of the seed's three kinds.
public enum IOMemory: @unchecked Sendable {
    /// `dm_io_sync` / `dm_io_async`: a page list, starting `offset` bytes
    /// into its first page.
    case pageList(PageList, offset: Int)
    /// `dm_io_sync_bvec` / `dm_io_async_bvec`: bio vectors, in order.
    case bioVectors([BioVec])
    /// `dm_io_sync_vm` / `dm_io_async_vm`: one contiguous buffer.
    case buffer(UnsafeMutableRawBufferPointer)

    /// A contiguous buffer to write from.
    public static func constant(_ bytes: UnsafeRawBufferPointer) -> IOMemory {
        .buffer(UnsafeMutableRawBufferPointer(mutating: bytes))
    }

    /// How many bytes the memory holds.
    public var byteCount: Int {
        switch self {
        case .pageList(let list, let offset): list.byteCount(from: offset)
        case .bioVectors(let vectors): vectors.reduce(0) { $0 + $1.length }
        case .buffer(let buffer): buffer.count
        }
    }

    /// Copies the memory's first `bytes.count` bytes out.
    public func copy(to bytes: UnsafeMutableRawBufferPointer) {
        var iterator = PageIterator(self)
        var done = 0
        while done < bytes.count, let segment = iterator.next(maxBytes: bytes.count - done) {
            (bytes.baseAddress! + done).copyMemory(from: segment.baseAddress!, byteCount: segment.count)
            done += segment.count
        }
    }

    func validate() throws(DMIOError) {
        switch self {
        case .pageList(let list, let offset):
            guard offset >= 0, offset < pageSize || (list.pages.isEmpty && offset == 0) else {
                throw .invalidMemory("page-list offset \(offset) is outside the first page")
            }
        case .bioVectors(let vectors):
            for (index, vector) in vectors.enumerated() where vector.offset < 0 || vector.length < 0 {
                throw .invalidMemory("bio vector \(index) has offset \(vector.offset), length \(vector.length)")
            }
        case .buffer(let buffer):
            guard buffer.count == 0 || buffer.baseAddress != nil else {
                throw .invalidMemory("buffer without an address")
            }
        }
    }
}

/// The kernel's `struct dpages`: walks any of the three memory kinds as a
/// sequence of contiguous segments, so that the code which builds I/O never
/// knows which kind it walks.
struct PageIterator {
    private let memory: IOMemory
    private var index = 0
    private var offset: Int

    init(_ memory: IOMemory) {
        self.memory = memory
        if case .pageList(_, let start) = memory { offset = start } else { offset = 0 }
    }

    /// The next contiguous segment, at most `maxBytes` long; nil at the end.
    mutating func next(maxBytes: Int) -> UnsafeMutableRawBufferPointer? {
        switch memory {
        case .pageList(let list, _):
            guard index < list.pages.count else { return nil }
            let length = min(pageSize - offset, maxBytes)
            let segment = UnsafeMutableRawBufferPointer(start: list.pages[index] + offset, count: length)
            advance(by: length, segmentLength: pageSize)
            return segment
        case .bioVectors(let vectors):
            while index < vectors.count, vectors[index].length == 0 { index += 1 }
            guard index < vectors.count else { return nil }
            let vector = vectors[index]
            let length = min(vector.length - offset, maxBytes)
            let segment = UnsafeMutableRawBufferPointer(start: vector.page + vector.offset + offset, count: length)
            advance(by: length, segmentLength: vector.length)
            return segment
        case .buffer(let buffer):
            guard offset < buffer.count else { return nil }
            let length = min(buffer.count - offset, maxBytes)
            let segment = UnsafeMutableRawBufferPointer(start: buffer.baseAddress! + offset, count: length)
            offset += length
            return segment
        }
    }

    private mutating func advance(by length: Int, segmentLength: Int) {
        offset += length
        if offset == segmentLength {
            index += 1
            offset = 0
        }
    }
}
