import Atomics

/// Zeroed 64-bit atomic words in one block aligned to a cache line, freed
/// with this object. The I/O path reaches them through `words`, which holds
/// no reference to it (a use costs no retain and release) and is valid
/// while it lives.
public final class AtomicWords: @unchecked Sendable {
    public let words: Words
    private let count: Int

    public init(count: Int) {
        let base = UnsafeMutableRawPointer
            .allocate(byteCount: count * MemoryLayout<UnsafeAtomic<UInt64>.Storage>.stride, alignment: 64)
            .bindMemory(to: UnsafeAtomic<UInt64>.Storage.self, capacity: count)
        base.initialize(repeating: UnsafeAtomic<UInt64>.Storage(0), count: count)
        words = Words(base: base)
        self.count = count
    }

    deinit {
        words.base.deinitialize(count: count)
        UnsafeMutableRawPointer(words.base).deallocate()
    }

    /// The words, by index. Relaxed: for counts and hints, not to order
    /// other memory.
    public struct Words: @unchecked Sendable {
        fileprivate let base: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>

        /// The words from `index` on.
        @inline(__always)
        public func from(_ index: Int) -> Words { Words(base: base + index) }

        @inline(__always)
        public func load(_ index: Int) -> UInt64 { word(index).load(ordering: .relaxed) }

        @inline(__always)
        public func store(_ index: Int, _ value: UInt64) { word(index).store(value, ordering: .relaxed) }

        @inline(__always)
        public func add(_ index: Int, _ value: UInt64 = 1) { word(index).wrappingIncrement(by: value, ordering: .relaxed) }

        @inline(__always)
        public func subtract(_ index: Int, _ value: UInt64 = 1) {
            word(index).wrappingDecrement(by: value, ordering: .relaxed)
        }

        @inline(__always)
        private func word(_ index: Int) -> UnsafeAtomic<UInt64> { UnsafeAtomic(at: base + index) }
    }
}
