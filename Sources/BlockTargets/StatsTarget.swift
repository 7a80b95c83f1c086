import DMIO
import Glibc

/// A target that counts the requests it passes to the one below it, as
/// nbdkit's stats filter stacks over a plugin: per operation, requests,
/// bytes, errors by errno, and histograms of durations and sizes, for the
/// metrics (`statistics`). Stacked only when metrics are asked for; a
/// request costs two clock reads, a few uncontended atomic adds, and the
/// completion that carries its start time.
public final class StatsTarget: BlockTarget {
    /// What `statistics` counts, by its `rawValue`.
    public enum Operation: Int, CaseIterable, Sendable {
        case read, write, flush, trim, writeZeroes, cache, blockStatus

        /// The name metrics label the operation with.
        public var metricName: String {
            switch self {
            case .read: "read"
            case .write: "write"
            case .flush: "flush"
            case .trim: "trim"
            case .writeZeroes: "write_zeroes"
            case .cache: "cache"
            case .blockStatus: "block_status"
            }
        }
    }

    public let inner: any BlockTarget
    public let statistics = RequestStatistics(operations: Operation.allCases.map(\.metricName))

    /// Where the requests count.
    private let recorder: RequestStatistics.Recorder

    public init(_ inner: any BlockTarget) {
        self.inner = inner
        recorder = statistics.recorder
    }

    public var size: UInt64 { inner.size }
    public var blockSizes: BlockSizes { inner.blockSizes }
    public var capabilities: TargetCapabilities { inner.capabilities }
    public var metaContexts: [String] { inner.metaContexts }

    /// `completion`, counting the request's end first. The recorder holds
    /// no reference: the served target (and so its statistics) outlives
    /// every request the server answers.
    private func counting(_ operation: Operation, bytes: UInt64,
                          _ completion: @escaping TargetCompletion) -> TargetCompletion {
        let startedAt = recorder.start(operation.rawValue)
        return { [recorder] result in
            recorder.end(operation.rawValue, bytes: bytes, errno: result.errno, startedAt: startedAt)
            completion(result)
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64, context: IOContext,
                     completion: @escaping TargetCompletion) {
        inner.read(into: buffer, offset: offset, context: context,
                   completion: counting(.read, bytes: UInt64(buffer.count), completion))
    }

    public func write(_ data: IOMemory, offset: UInt64, fua: Bool, context: IOContext,
                      completion: @escaping TargetCompletion) {
        inner.write(data, offset: offset, fua: fua, context: context,
                    completion: counting(.write, bytes: UInt64(data.byteCount), completion))
    }

    public func flush(context: IOContext, completion: @escaping TargetCompletion) {
        inner.flush(context: context, completion: counting(.flush, bytes: 0, completion))
    }

    public func trim(offset: UInt64, length: UInt64, fua: Bool, context: IOContext,
                     completion: @escaping TargetCompletion) {
        inner.trim(offset: offset, length: length, fua: fua, context: context,
                   completion: counting(.trim, bytes: length, completion))
    }

    public func writeZeroes(offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool, context: IOContext,
                            completion: @escaping TargetCompletion) {
        inner.writeZeroes(offset: offset, length: length, mayUnmap: mayUnmap, fua: fua, context: context,
                          completion: counting(.writeZeroes, bytes: length, completion))
    }

    public func cache(offset: UInt64, length: UInt64, context: IOContext, completion: @escaping TargetCompletion) {
        inner.cache(offset: offset, length: length, context: context, completion: counting(.cache, bytes: length, completion))
    }

    public func allocation(offset: UInt64, length: UInt64, maxExtents: Int) throws -> [Extent] {
        try countingBlockStatus(length) { try inner.allocation(offset: offset, length: length, maxExtents: maxExtents) }
    }

    public func blockStatus(context: String, offset: UInt64, length: UInt64, maxExtents: Int) throws -> [Extent] {
        try countingBlockStatus(length) {
            try inner.blockStatus(context: context, offset: offset, length: length, maxExtents: maxExtents)
        }
    }

    /// Block status answers at once, or throws the request's result.
    private func countingBlockStatus(_ length: UInt64, _ body: () throws -> [Extent]) throws -> [Extent] {
        let startedAt = RequestStatistics.now()
        do {
            let extents = try body()
            recorder.record(Operation.blockStatus.rawValue, bytes: length, errno: 0, startedAt: startedAt)
            return extents
        } catch {
            let errno = (error as? TargetResult)?.errno ?? EIO
            recorder.record(Operation.blockStatus.rawValue, bytes: length, errno: errno, startedAt: startedAt)
            throw error
        }
    }

    /// The server asks this only of a read it then answers as a hole,
    /// without `read`: such a read counts here.
    public func readsAsZeroes(offset: UInt64, length: UInt64) -> Bool {
        let startedAt = RequestStatistics.now()
        let zeroes = inner.readsAsZeroes(offset: offset, length: length)
        if zeroes { recorder.record(Operation.read.rawValue, bytes: length, errno: 0, startedAt: startedAt) }
        return zeroes
    }

    public func beginBatch(context: IOContext) { inner.beginBatch(context: context) }
    public func endBatch(context: IOContext) { inner.endBatch(context: context) }
}
