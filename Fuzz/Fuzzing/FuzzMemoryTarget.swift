import BlockTargets
import DMIO
import Glibc

/// A target in memory that answers at once. It traps on a request outside
/// it: the server must have refused that request before it got here.
final class FuzzMemoryTarget: BlockTarget, @unchecked Sendable {
    private var bytes: [UInt8]
    var size: UInt64 { UInt64(bytes.count) }
    let blockSizes = BlockSizes(minimum: 512, preferred: 4096, maximumPayload: 1 << 20)
    let capabilities: TargetCapabilities = [.flush, .fua, .trim, .writeZeroes, .cache, .multiConnection]

    init(size: Int) { bytes = [UInt8](repeating: 0, count: size) }

    private func range(_ offset: UInt64, _ length: Int) -> Range<Int> {
        precondition(offset <= size && UInt64(length) <= size - offset, "request outside the target: \(offset)+\(length)")
        return Int(offset)..<Int(offset) + length
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64, context: IOContext,
              completion: @escaping TargetCompletion) {
        let range = range(offset, buffer.count)
        bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[range])) }
        completion(.success)
    }

    func write(_ data: IOMemory, offset: UInt64, fua: Bool, context: IOContext, completion: @escaping TargetCompletion) {
        let range = range(offset, data.byteCount)
        bytes.withUnsafeMutableBytes { data.copy(to: UnsafeMutableRawBufferPointer(rebasing: $0[range])) }
        completion(.success)
    }

    func trim(offset: UInt64, length: UInt64, fua: Bool, context: IOContext, completion: @escaping TargetCompletion) {
        writeZeroes(offset: offset, length: length, mayUnmap: true, fua: fua, context: context, completion: completion)
    }

    func writeZeroes(offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool, context: IOContext,
                     completion: @escaping TargetCompletion) {
        for index in range(offset, Int(length)) { bytes[index] = 0 }
        completion(.success)
    }

    func flush(context: IOContext, completion: @escaping TargetCompletion) { completion(.success) }

    func cache(offset: UInt64, length: UInt64, context: IOContext, completion: @escaping TargetCompletion) {
        _ = range(offset, Int(length))
        completion(.success)
    }

    func allocation(offset: UInt64, length: UInt64, maxExtents: Int) throws -> [Extent] {
        _ = range(offset, Int(length))
        return [Extent(length: UInt32(clamping: length), flags: 0)]
    }

    var metaContexts: [String] { [] }

    func blockStatus(context: String, offset: UInt64, length: UInt64, maxExtents: Int) throws -> [Extent] {
        throw TargetResult.noMetaContext(context)
    }

    func readsAsZeroes(offset: UInt64, length: UInt64) -> Bool { false }
    func beginBatch(context: IOContext) {}
    func endBatch(context: IOContext) {}
}
