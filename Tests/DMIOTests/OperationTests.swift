import DMIO
import Foundation
import TestSupport
import Testing

/// Discard, write-zeroes, flush and FUA on each kind of device.
@Suite struct OperationTests {
    let folder = TemporaryFolder()
    let shm = TemporaryFolder(in: "/dev/shm")

    /// Writes a pattern to sectors 0..<64, runs `operation` on 16..<48 and
    /// returns what the whole range reads back as.
    private func apply(_ operation: IOOperation, flags: IOFlags = [], device: BlockDevice,
                       client: DMIOClient) throws -> (before: [UInt8], after: [UInt8]) {
        let data = AlignedBuffer(count: 64 * 512, pattern: 8)
        let whole = IORegion(device: device, sector: 0, count: 64)
        #expect(try client.sync(.write, regions: [whole], buffer: data.bytes) == .success)
        #expect(try client.sync(operation, regions: [IORegion(device: device, sector: 16, count: 32)],
                                flags: flags) == .success)
        let back = AlignedBuffer(count: 64 * 512)
        #expect(try client.sync(.read, regions: [whole], buffer: back.bytes) == .success)
        return (data.array, back.array)
    }

    private func expectZeroedMiddle(_ result: (before: [UInt8], after: [UInt8]),
                                    sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(result.after[..<(16 * 512)] == result.before[..<(16 * 512)], sourceLocation: sourceLocation)
        #expect(result.after[(16 * 512)..<(48 * 512)].allSatisfy { $0 == 0 }, sourceLocation: sourceLocation)
        #expect(result.after[(48 * 512)...] == result.before[(48 * 512)...], sourceLocation: sourceLocation)
    }

    @Test(arguments: engines, ["/tmp", "/dev/shm"])
    func discardPunchesAHoleInAFile(engine: IOEngineKind, base: String) throws {
        let client = try client(engine)
        let device = try BlockDevice.open((base == "/tmp" ? folder : shm).file("disk", size: 1 << 20))
        let result = try apply(.discard, device: device, client: client)
        expectZeroedMiddle(result)
        #expect(allocatedBytes(device.name) <= 32 * 512, "the discarded half is deallocated")
    }

    /// On ext4 both kinds of zeroing run in the file system; tmpfs cannot
    /// ZERO_RANGE, so `noUnmap` falls back to writing zeroes there.
    @Test(arguments: engines, ["/tmp", "/dev/shm"])
    func writeZeroesReadsBackAsZeroes(engine: IOEngineKind, base: String) throws {
        let client = try client(engine)
        for flags in [IOFlags(), .noUnmap] {
            let path = (base == "/tmp" ? folder : shm).file("disk-\(flags.rawValue)", size: 1 << 20)
            let device = try BlockDevice.open(path)
            expectZeroedMiddle(try apply(.writeZeroes, flags: flags, device: device, client: client))
            if flags.contains(.noUnmap) {
                #expect(allocatedBytes(path) >= 64 * 512, "noUnmap keeps the blocks allocated")
            } else {
                #expect(allocatedBytes(path) <= 32 * 512, "zeroing may unmap")
            }
        }
    }

    @Test(arguments: engines)
    func flushAndFUAComplete(engine: IOEngineKind) throws {
        let client = try client(engine)
        let a = try BlockDevice.open(folder.file("a", size: 1 << 20))
        let b = try BlockDevice.open(shm.file("b", size: 1 << 20))
        let data = AlignedBuffer(count: 4096, pattern: 6)
        // A flush reaches every region's device, even regions of count 0.
        #expect(try client.sync(.flush, regions: [IORegion(device: a, sector: 0, count: 0),
                                                  IORegion(device: b, sector: 0, count: 0)]) == .success)
        let regions = [IORegion(device: a, sector: 8, count: 8), IORegion(device: b, sector: 8, count: 8)]
        #expect(try client.sync(.write, regions: regions, buffer: data.bytes, flags: .fua) == .success)
        #expect(fileBytes(a.name, offset: 4096, count: 4096) == data.array)
        #expect(fileBytes(b.name, offset: 4096, count: 4096) == data.array)
    }

    @Test(arguments: engines)
    func aBlockDeviceServesEveryOperation(engine: IOEngineKind) throws {
        let client = try client(engine)
        let backing = folder.file("loop-backing", size: 4 << 20)
        let loop = try LoopDevice(file: backing)
        let device = try BlockDevice.open(loop.path)
        #expect(device.size == 4 << 20, "size from BLKGETSIZE64")

        expectZeroedMiddle(try apply(.discard, device: device, client: client))
        expectZeroedMiddle(try apply(.writeZeroes, device: device, client: client))
        expectZeroedMiddle(try apply(.writeZeroes, flags: .noUnmap, device: device, client: client))
        let data = AlignedBuffer(count: 8192, pattern: 12)
        let region = IORegion(device: device, sector: 100, count: 16)
        #expect(try client.sync(.write, regions: [region], buffer: data.bytes, flags: .fua) == .success)
        #expect(try client.sync(.flush, regions: [region]) == .success)
        #expect(fileBytes(backing, offset: 100 * 512, count: 8192) == data.array)
    }

    @Test(arguments: engines)
    func aBlockDeviceWithDirectIO(engine: IOEngineKind) throws {
        let client = try client(engine)
        let backing = folder.file("loop-backing", size: 4 << 20)
        let loop = try LoopDevice(file: backing, direct: true)
        let device = try BlockDevice.open(loop.path, options: DeviceOptions(direct: true))
        #expect(device.blockSize == 512, "logical block size from BLKSSZGET")
        let data = AlignedBuffer(count: 8192 + 3, pattern: 13)
        let unaligned = UnsafeMutableRawBufferPointer(rebasing: data.bytes[3...])
        let region = IORegion(device: device, sector: 7, count: 16)
        #expect(try client.sync(.write, regions: [region], buffer: unaligned) == .success)
        #expect(try client.sync(.flush, regions: [region]) == .success)
        #expect(fileBytes(backing, offset: 7 * 512, count: 8192) == Array(unaligned))
    }

    @Test(arguments: engines)
    func aRemoteNBDExportServesEveryOperation(engine: IOEngineKind) throws {
        let client = try client(engine)
        let server = try NBDKit(["memory", "size=8M"])
        let device = try BlockDevice.open(server.uri)
        #expect(device.size == 8 << 20)
        #expect(device.name == server.uri)

        expectZeroedMiddle(try apply(.discard, device: device, client: client))
        expectZeroedMiddle(try apply(.writeZeroes, device: device, client: client))
        expectZeroedMiddle(try apply(.writeZeroes, flags: .noUnmap, device: device, client: client))
        for kind in MemoryKind.allCases {
            let count = 64 * 1024 + 1536
            let source = MemoryFixture(kind, count: count, client: client)
            let data = AlignedBuffer(count: count, pattern: 21).array
            source.load(data)
            let local = try BlockDevice.open(folder.file("local-\(kind)", size: 1 << 20))
            let regions = [IORegion(device: device, sector: 2048, count: UInt64(count / 512)),
                           IORegion(device: local, sector: 0, count: UInt64(count / 512))]
            #expect(try client.sync(.write, regions: regions, memory: source.memory, flags: .fua) == .success)
            let target = MemoryFixture(kind, count: count, client: client)
            #expect(try client.sync(.read, regions: [regions[0]], memory: target.memory) == .success)
            #expect(target.contents() == data, "\(kind)")
        }
        #expect(try client.sync(.flush, regions: [IORegion(device: device, sector: 0, count: 0)]) == .success)
    }

    @Test func aRemoteExportThatCannotBeReachedIsAClearError() throws {
        let uri = "nbd+unix:///?socket=\(folder.path)/nobody.sock"
        do {
            _ = try BlockDevice.open(uri)
            Issue.record("opened a socket nobody listens on")
        } catch {
            guard case .remoteFailed(let device, let message) = error else {
                Issue.record("unexpected \(error)")
                return
            }
            #expect(device == uri)
            #expect(message.contains("No such file"), "\(message)")
        }
    }
}

/// Which parts of a device hold data: the map block status is built on.
@Suite struct AllocationTests {
    @Test(arguments: ["/tmp", "/dev/shm"])
    func aSparseFileReportsItsHolesAndData(base: String) throws {
        let folder = TemporaryFolder(in: base)
        let client = try client(.threads)
        let device = try folder.device("disk", size: 8 << 20)
        let data = AlignedBuffer(count: 1 << 20, pattern: 1)
        #expect(try client.sync(.write, regions: [IORegion(device: device, sector: 4096, count: 2048)],
                                buffer: data.bytes) == .success)
        #expect(try device.allocation(offset: 0, length: 8 << 20, maxExtents: 10) == [
            DeviceExtent(length: 2 << 20, isHole: true), DeviceExtent(length: 1 << 20, isHole: false),
            DeviceExtent(length: 5 << 20, isHole: true)])
        #expect(try device.allocation(offset: 0, length: 8 << 20, maxExtents: 1) == [
            DeviceExtent(length: 2 << 20, isHole: true)])
        #expect(try device.allocation(offset: (2 << 20) + 4096, length: 8192, maxExtents: 10) == [
            DeviceExtent(length: 8192, isHole: false)])
        #expect(device.isHole(offset: 0, length: 2 << 20))
        #expect(!device.isHole(offset: 0, length: (2 << 20) + 512))
        #expect(!device.isHole(offset: 3 << 20 - 512, length: 512))
        #expect(device.isHole(offset: 3 << 20, length: 5 << 20))
    }

    @Test func aBlockDeviceReportsData() throws {
        let folder = TemporaryFolder()
        let loop = try LoopDevice(file: folder.file("backing", size: 1 << 20))
        let device = try BlockDevice.open(loop.path)
        #expect(try device.allocation(offset: 0, length: 1 << 20, maxExtents: 10) == [
            DeviceExtent(length: 1 << 20, isHole: false)])
    }
}
