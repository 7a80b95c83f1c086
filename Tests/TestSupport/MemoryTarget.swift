import BlockTargets
import DMIO
import Glibc

/// A target in memory that completes every request at once, on the calling
/// thread: for testing the protocol layer alone, on an EmbeddedChannel (the
/// tests, and the fuzz targets, where a request outside it traps).
public final class MemoryTarget: BlockTarget, @unchecked Sendable {
    public var bytes: [UInt8]
    public var size: UInt64 { UInt64(bytes.count) }
    public let blockSizes = BlockSizes(minimum: 512, preferred: 4096, maximumPayload: 1 << 20)
    public let capabilities: TargetCapabilities = [.flush, .fua, .trim, .writeZeroes, .cache, .multiConnection]
    /// The errno the next request fails with, once.
    public var failNext: Int32 = 0
    /// Reads at this offset wait in `held` until the test releases them.
    public var holdReadsAt: UInt64?
    /// Every read waits in `held`.
    public var holdAllReads = false
    public var held: [() -> Void] = []
    /// Batches begun and not yet ended. As a real target may, reads and
    /// writes issued inside a batch start only when it ends.
    public var openBatches = 0
    private var heldByBatch: [() -> Void] = []

    public init(size: Int) { bytes = [UInt8](repeating: 0, count: size) }

    /// The bytes of a request; traps on one outside the target: the server
    /// must have refused it before it got here.
    private func range(_ offset: UInt64, _ length: Int) -> Range<Int> {
        precondition(offset <= size && UInt64(length) <= size - offset, "request outside the target: \(offset)+\(length)")
        return Int(offset)..<Int(offset) + length
    }

    private func finish(_ completion: TargetCompletion, _ body: () -> Void) {
        if failNext != 0 {
            completion(TargetResult(errno: failNext, message: "injected failure"))
            failNext = 0
            return
        }
        body()
        completion(.success)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64, context: IOContext,
                     completion: @escaping TargetCompletion) {
        afterBatch { [self] in readNow(into: buffer, offset: offset, completion: completion) }
    }

    private func readNow(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64, completion: @escaping TargetCompletion) {
        if offset == holdReadsAt || holdAllReads {
            held.append { [self] in
                holdAllReads = false
                readNow(into: buffer, offset: offset, completion: completion)
            }
            holdReadsAt = nil
            return
        }
        let range = range(offset, buffer.count)
        finish(completion) { bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[range])) } }
    }

    public func write(_ data: IOMemory, offset: UInt64, fua: Bool, context: IOContext,
                      completion: @escaping TargetCompletion) {
        let range = range(offset, data.byteCount)
        afterBatch { [self] in
            finish(completion) { bytes.withUnsafeMutableBytes { data.copy(to: UnsafeMutableRawBufferPointer(rebasing: $0[range])) } }
        }
    }

    public func flush(context: IOContext, completion: @escaping TargetCompletion) { finish(completion) {} }

    public func beginBatch(context: IOContext) { openBatches += 1 }

    public func endBatch(context: IOContext) {
        openBatches -= 1
        guard openBatches == 0 else { return }
        let started = heldByBatch
        heldByBatch.removeAll()
        for start in started { start() }
    }

    private func afterBatch(_ start: @escaping () -> Void) {
        if openBatches > 0 { heldByBatch.append(start) } else { start() }
    }

    public func trim(offset: UInt64, length: UInt64, fua: Bool, context: IOContext,
                     completion: @escaping TargetCompletion) {
        writeZeroes(offset: offset, length: length, mayUnmap: true, fua: fua, context: context, completion: completion)
    }

    public func writeZeroes(offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool, context: IOContext,
                            completion: @escaping TargetCompletion) {
        let range = range(offset, Int(length))
        // One memset: a byte-by-byte replacement, instrumented for coverage,
        // was a quarter of the fuzzer's time.
        finish(completion) { bytes.withUnsafeMutableBytes { _ = UnsafeMutableRawBufferPointer(rebasing: $0[range]).initializeMemory(as: UInt8.self, repeating: 0) } }
    }

    public func cache(offset: UInt64, length: UInt64, context: IOContext, completion: @escaping TargetCompletion) {
        _ = range(offset, Int(length))
        finish(completion) {}
    }

    public func readsAsZeroes(offset: UInt64, length: UInt64) -> Bool { false }

    public func allocation(offset: UInt64, length: UInt64, maxExtents: Int) throws -> [Extent] {
        _ = range(offset, Int(length))
        return [Extent(length: UInt32(length), flags: 0)]
    }

    public var metaContexts: [String] { [] }

    public func blockStatus(context: String, offset: UInt64, length: UInt64, maxExtents: Int) throws -> [Extent] {
        throw TargetResult.noMetaContext(context)
    }
}
