import BlockTargets
import DMIO
import Glibc
@testable import NBD

/// A target in memory that completes every request at once, on the calling
/// thread: for testing the protocol layer alone, on an EmbeddedChannel.
final class MemoryTarget: BlockTarget, @unchecked Sendable {
    var bytes: [UInt8]
    var size: UInt64 { UInt64(bytes.count) }
    let blockSizes = BlockSizes(minimum: 512, preferred: 4096, maximumPayload: 1 << 20)
    let capabilities: TargetCapabilities = [.flush, .fua, .trim, .writeZeroes, .cache, .multiConnection]
    /// The errno the next request fails with, once.
    var failNext: Int32 = 0
    /// Reads at this offset wait in `held` until the test releases them.
    var holdReadsAt: UInt64?
    /// Every read waits in `held`.
    var holdAllReads = false
    var held: [() -> Void] = []
    /// Batches begun and not yet ended. As a real target may, reads and
    /// writes issued inside a batch start only when it ends.
    var openBatches = 0
    private var heldByBatch: [() -> Void] = []

    init(size: Int) { bytes = [UInt8](repeating: 0, count: size) }

    private func finish(_ completion: TargetCompletion, _ body: () -> Void) {
        if failNext != 0 {
            completion(TargetResult(errno: failNext, message: "injected failure"))
            failNext = 0
            return
        }
        body()
        completion(.success)
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64, context: IOContext,
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
        finish(completion) { bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count])) } }
    }

    func write(_ data: IOMemory, offset: UInt64, fua: Bool, context: IOContext, completion: @escaping TargetCompletion) {
        afterBatch { [self] in
            finish(completion) {
                bytes.withUnsafeMutableBytes { data.copy(to: UnsafeMutableRawBufferPointer(rebasing: $0[Int(offset)...].prefix(data.byteCount))) }
            }
        }
    }

    func flush(context: IOContext, completion: @escaping TargetCompletion) { finish(completion) {} }

    func beginBatch(context: IOContext) { openBatches += 1 }

    func endBatch(context: IOContext) {
        openBatches -= 1
        guard openBatches == 0 else { return }
        let started = heldByBatch
        heldByBatch.removeAll()
        for start in started { start() }
    }

    private func afterBatch(_ start: @escaping () -> Void) {
        if openBatches > 0 { heldByBatch.append(start) } else { start() }
    }

    func trim(offset: UInt64, length: UInt64, fua: Bool, context: IOContext, completion: @escaping TargetCompletion) {
        writeZeroes(offset: offset, length: length, mayUnmap: true, fua: fua, context: context, completion: completion)
    }

    func writeZeroes(offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool, context: IOContext,
                     completion: @escaping TargetCompletion) {
        finish(completion) {
            bytes.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length)))
        }
    }

    func cache(offset: UInt64, length: UInt64, context: IOContext, completion: @escaping TargetCompletion) {
        finish(completion) {}
    }

    func readsAsZeroes(offset: UInt64, length: UInt64) -> Bool { false }

    func allocation(offset: UInt64, length: UInt64, maxExtents: Int) throws -> [Extent] {
        [Extent(length: UInt32(length), flags: 0)]
    }

    var metaContexts: [String] { [] }

    func blockStatus(context: String, offset: UInt64, length: UInt64, maxExtents: Int) throws -> [Extent] {
        throw TargetResult.noMetaContext(context)
    }
}
