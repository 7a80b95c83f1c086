import DMIO
import Glibc

/// The simplest target: one region of one device (dm-linear). Every request
/// is one DMIO request on that region.
public final class LinearTarget: BlockTarget, @unchecked Sendable {
    public let device: BlockDevice
    /// The client for threads without one of their own (see `io`).
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
        let minimum = UInt32(max(sectorSize, device.blockSize))
        blockSizes = BlockSizes(minimum: minimum, preferred: max(minimum, 4096), maximumPayload: 32 << 20)
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

    public func read(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64,
                     completion: @escaping TargetCompletion) {
        submit(.read, region(offset, UInt64(buffer.count)), memory: .buffer(buffer), completion: completion)
    }

    public func write(_ data: IOMemory, offset: UInt64, fua: Bool, completion: @escaping TargetCompletion) {
        submit(.write, region(offset, UInt64(data.byteCount)), memory: data,
               flags: fua ? .fua : [], completion: completion)
    }

    public func flush(completion: @escaping TargetCompletion) {
        // Nothing was written through a read-only device: nothing to make
        // durable (and DMIO refuses flushes there, as writes).
        if device.isReadOnly { return completion(.success) }
        submit(.flush, region(0, 0), completion: completion)
    }

    public func trim(offset: UInt64, length: UInt64, fua: Bool, completion: @escaping TargetCompletion) {
        submit(.discard, region(offset, length), flags: fua ? .fua : [], completion: { result in
            // Discard is a hint: a device that cannot discard has done nothing wrong.
            completion(result.errno == EOPNOTSUPP ? .success : result)
        })
    }

    public func writeZeroes(offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool,
                            completion: @escaping TargetCompletion) {
        var flags: IOFlags = mayUnmap ? [] : .noUnmap
        if fua { flags.insert(.fua) }
        submit(.writeZeroes, region(offset, length), flags: flags, completion: completion)
    }

    public func cache(offset: UInt64, length: UInt64, completion: @escaping TargetCompletion) {
        // Reads go through the page cache already; nothing to prefetch into.
        completion(.success)
    }

    public func allocation(offset: UInt64, length: UInt64, maxExtents: Int) throws -> [Extent] {
        do {
            return try device.allocation(offset: start + offset, length: length, maxExtents: maxExtents)
                .map { Extent(length: UInt32($0.length), flags: $0.isHole ? Extent.hole | Extent.zero : 0) }
        } catch {
            throw TargetResult(errno: EIO, message: "\(error)")
        }
    }

    /// The calling event loop's own client where it has one (the server
    /// gives each loop one), so that its I/O needs no other thread.
    private var io: DMIOClient { DMIOClient.current ?? client }

    public func beginBatch() { io.plug() }
    public func endBatch() { io.unplug() }

    public func readsAsZeroes(offset: UInt64, length: UInt64) -> Bool {
        device.isHole(offset: start + offset, length: length)
    }

    private func submit(_ operation: IOOperation, _ regions: [IORegion], memory: IOMemory? = nil,
                        flags: IOFlags = [], completion: @escaping TargetCompletion) {
        do {
            try io.submit(operation, regions: regions, memory: memory, flags: flags) { result, _ in
                completion(TargetResult(result, device: self.device))
            }
        } catch {
            // The server checked the request against this target already.
            completion(TargetResult(errno: EINVAL, message: "\(error)"))
        }
    }
}

extension TargetResult {
    /// A DMIO result of one region on `device`.
    init(_ result: IOResult, device: BlockDevice) {
        if let failure = result.failures.first {
            self.init(errno: failure.errno, message: "\(device.name): \(errnoDescription(failure.errno))")
        } else {
            self = .success
        }
    }
}
