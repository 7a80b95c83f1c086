import DMIO
import Glibc

/// The simplest target: one region of one device (dm-linear). Every request
/// is one DMIO request on that region.
public final class LinearTarget: BlockTarget, @unchecked Sendable {
    public let device: BlockDevice
    /// The client for callers without one of their own (see `IOContext`).
    public let client: DMIOClient
    /// Where the target starts on the device, in bytes.
    public let start: UInt64
    public let size: UInt64
    public let blockSizes: BlockSizes
    public let capabilities: TargetCapabilities

    /// Serves `length` bytes of `device` from `start` (both multiples of
    /// the device's block size); by default the whole device.
    public init(device: BlockDevice, client: DMIOClient, start: UInt64 = 0, length: UInt64? = nil) {
        self.device = device
        self.client = client
        self.start = start
        size = length ?? (device.size - start)
        blockSizes = .over(deviceBlockSize: device.blockSize)
        var capabilities: TargetCapabilities = [.flush, .fua, .cache, .multiConnection]
        if device.isReadOnly {
            capabilities.insert(.readOnly)
        } else {
            capabilities.formUnion([.trim, .writeZeroes])
            // Zeroing a file that may unmap is a hole punch: metadata only.
            if device.kind == .file { capabilities.insert(.fastZero) }
        }
        self.capabilities = capabilities
    }

    private func region(_ offset: UInt64, _ length: UInt64) -> [IORegion] {
        [IORegion(device: device, sector: (start + offset) >> 9, count: length >> 9)]
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64, context: IOContext,
                     completion: @escaping TargetCompletion) {
        submit(.read, region(offset, UInt64(buffer.count)), memory: .buffer(buffer), context: context,
               completion: completion)
    }

    public func write(_ data: IOMemory, offset: UInt64, fua: Bool, context: IOContext,
                      completion: @escaping TargetCompletion) {
        submit(.write, region(offset, UInt64(data.byteCount)), memory: data, flags: .write(fua: fua),
               context: context, completion: completion)
    }

    public func flush(context: IOContext, completion: @escaping TargetCompletion) {
        // Nothing was written through a read-only device: nothing to make
        // durable (and DMIO refuses flushes there, as writes).
        if device.isReadOnly { return completion(.success) }
        submit(.flush, region(0, 0), context: context, completion: completion)
    }

    public func trim(offset: UInt64, length: UInt64, fua: Bool, context: IOContext,
                     completion: @escaping TargetCompletion) {
        submit(.discard, region(offset, length), flags: .write(fua: fua), context: context) { result in
            // Discard is a hint: a device that cannot discard has done nothing wrong.
            completion(result.errno == EOPNOTSUPP ? .success : result)
        }
    }

    public func writeZeroes(offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool, context: IOContext,
                            completion: @escaping TargetCompletion) {
        submit(.writeZeroes, region(offset, length), flags: .zeroing(mayUnmap: mayUnmap, fua: fua),
               context: context, completion: completion)
    }

    public func cache(offset: UInt64, length: UInt64, context: IOContext, completion: @escaping TargetCompletion) {
        // Reads go through the page cache already; nothing to prefetch into.
        completion(.success)
    }

    public func allocation(offset: UInt64, length: UInt64, maxExtents: Int) throws -> [Extent] {
        try device.extents(offset: start + offset, length: length, maxExtents: maxExtents)
    }

    public var metaContexts: [String] { [] }

    public func blockStatus(context: String, offset: UInt64, length: UInt64, maxExtents: Int) throws -> [Extent] {
        throw TargetResult.noMetaContext(context)
    }

    public func readsAsZeroes(offset: UInt64, length: UInt64) -> Bool {
        device.isHole(offset: start + offset, length: length)
    }

    public func beginBatch(context: IOContext) { context.client(or: client).plug() }
    public func endBatch(context: IOContext) { context.client(or: client).unplug() }

    private func submit(_ operation: IOOperation, _ regions: [IORegion], memory: IOMemory? = nil,
                        flags: IOFlags = [], context: IOContext, completion: @escaping TargetCompletion) {
        do {
            try context.client(or: client).submit(operation, regions: regions, memory: memory, flags: flags) {
                result, _ in completion(TargetResult(result, device: self.device))
            }
        } catch {
            // The server checked the request against this target already.
            completion(TargetResult(errno: EINVAL, message: "\(error)"))
        }
    }
}
