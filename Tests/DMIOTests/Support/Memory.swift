import DMIO
import Foundation
import Testing

/// The seed's three memory types.
enum MemoryKind: String, CaseIterable, CustomStringConvertible {
    case pageList, bioVectors, buffer
    var description: String { rawValue }
}

/// Memory of one kind holding `count` bytes, laid out the awkward way each
/// kind allows: a page list entered mid-page, bio vectors of uneven lengths
/// scattered over a larger buffer with gaps, one contiguous buffer.
final class MemoryFixture {
    let memory: IOMemory
    let count: Int
    private let client: DMIOClient
    private var pages: PageList?
    private var storage: AlignedBuffer?

    static let pageListOffset = 1000

    init(_ kind: MemoryKind, count: Int, client: DMIOClient) {
        self.count = count
        self.client = client
        switch kind {
        case .pageList:
            let list = client.allocatePages((Self.pageListOffset + count + pageSize - 1) / pageSize)
            pages = list
            memory = .pageList(list, offset: Self.pageListOffset)
        case .bioVectors:
            let lengths = [512, 3584, 1000, 24, 7000]
            let gap = 64
            let buffer = AlignedBuffer(count: count + gap * (count / 512 + 8))
            storage = buffer
            var vectors: [BioVec] = []
            var placed = 0
            var position = 0
            while placed < count {
                let length = min(lengths[vectors.count % lengths.count], count - placed)
                vectors.append(BioVec(page: buffer.bytes.baseAddress!, offset: position, length: length))
                placed += length
                position += length + gap
            }
            memory = .bioVectors(vectors)
        case .buffer:
            let buffer = AlignedBuffer(count: count)
            storage = buffer
            memory = .buffer(buffer.bytes)
        }
    }

    deinit {
        if let pages { client.release(pages) }
    }

    func load(_ bytes: [UInt8]) {
        precondition(bytes.count == count)
        var done = 0
        forEachSegment { segment in
            segment.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes.withUnsafeBytes { $0 }[done..<done + segment.count]))
            done += segment.count
        }
    }

    func contents() -> [UInt8] {
        var bytes: [UInt8] = []
        forEachSegment { bytes.append(contentsOf: $0) }
        return bytes
    }

    private func forEachSegment(_ body: (UnsafeMutableRawBufferPointer) -> Void) {
        switch memory {
        case .pageList(let list, let offset):
            var position = offset
            var left = count
            for page in list.pages where left > 0 {
                guard position < pageSize else { position -= pageSize; continue }
                let length = min(pageSize - position, left)
                body(UnsafeMutableRawBufferPointer(start: page + position, count: length))
                left -= length
                position = 0
            }
        case .bioVectors(let vectors):
            for vector in vectors {
                body(UnsafeMutableRawBufferPointer(start: vector.page + vector.offset, count: vector.length))
            }
        case .buffer(let buffer):
            body(UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count]))
        }
    }
}

/// The seed's two forms, plus Swift concurrency.
enum CallForm: String, CaseIterable, CustomStringConvertible {
    /// `callbackOnRegionPointer`: the callback form given its regions as a
    /// pointer and a count, as the kernel's `dm_io` takes them.
    case sync, callback, callbackOnRegionPointer, swiftAsync
    var description: String { rawValue }
}

/// Counts completions of callback requests, to check each comes exactly once.
final class CompletionCounter: @unchecked Sendable {
    private let lock = NSCondition()
    private var results: [IOResult] = []

    func record(_ result: IOResult) {
        lock.lock()
        results.append(result)
        lock.broadcast()
        lock.unlock()
    }

    func waitFor(_ count: Int) -> [IOResult] {
        lock.lock()
        defer { lock.unlock() }
        while results.count < count {
            if !lock.wait(until: Date().addingTimeInterval(30)) { break }
        }
        return results
    }
}

/// Runs one request in `form` and returns its result.
func perform(_ client: DMIOClient, _ form: CallForm, _ operation: IOOperation, _ regions: [IORegion],
             memory: IOMemory? = nil, flags: IOFlags = [],
             sourceLocation: SourceLocation = #_sourceLocation) async throws -> IOResult {
    switch form {
    case .sync:
        return try client.sync(operation, regions: regions, memory: memory, flags: flags)
    case .callback, .callbackOnRegionPointer:
        let counter = CompletionCounter()
        let context = NSString(string: "context")
        let notify: IONotify = { result, given in
            #expect(given === context, sourceLocation: sourceLocation)
            counter.record(result)
        }
        if form == .callback {
            try client.submit(operation, regions: regions, memory: memory, flags: flags, context: context, notify: notify)
        } else {
            try regions.withUnsafeBufferPointer { regions throws(DMIOError) in
                try client.submit(operation, regions: regions, memory: memory, flags: flags, context: context,
                                  notify: notify)
            }
        }
        let results = counter.waitFor(1)
        usleep(2000)  // a second completion, if there were one, would arrive now
        #expect(counter.waitFor(1).count == 1, "completion must be called exactly once", sourceLocation: sourceLocation)
        return try #require(results.first, sourceLocation: sourceLocation)
    case .swiftAsync:
        return try await client.perform(operation, regions: regions, memory: memory, flags: flags)
    }
}
