import DMIO
import Foundation
import TestSupport
import Testing

/// Real faults, no mocks: a full file system, a server that fails I/O, a
/// server that dies. Only the failing region's bit is set, with its errno,
/// and the other regions hold the data.
@Suite struct FaultTests {
    let folder = TemporaryFolder()

    /// The first 4 KiB of a new local file and of `remote` as two regions,
    /// after `data` was written to both.
    private func mirroredOnce(_ data: AlignedBuffer, to remote: BlockDevice,
                              client: DMIOClient) throws -> (localPath: String, regions: [IORegion]) {
        let localPath = folder.file("local", size: 8 << 20)
        let local = try BlockDevice.open(localPath)
        let regions = [IORegion(device: local, sector: 0, count: 8), IORegion(device: remote, sector: 0, count: 8)]
        #expect(try client.sync(.write, regions: regions, buffer: data.bytes) == .success)
        return (localPath, regions)
    }

    @Test(arguments: engines)
    func aFullFileSystemFailsOnlyItsRegion(engine: IOEngineKind) throws {
        let client = try client(engine)
        let tmpfs = try SmallTmpfs(bytes: 256 << 10)
        let healthyPath = folder.file("healthy", size: 8 << 20)
        let fullPath = tmpfs.path + "/leg"
        let healthy = try BlockDevice.open(healthyPath)
        let full = try BlockDevice.open(fullPath, options: DeviceOptions(createSize: 8 << 20))
        let data = AlignedBuffer(count: 1 << 20, pattern: 31)
        let regions = [IORegion(device: healthy, sector: 0, count: 2048), IORegion(device: full, sector: 0, count: 2048)]

        let result = try client.sync(.write, regions: regions, buffer: data.bytes)
        #expect(result.errorBits == .region(1))
        #expect(result.errno(ofRegion: 1) == ENOSPC)
        #expect(result.errno(ofRegion: 0) == nil)
        #expect(fileBytes(healthyPath, count: 1 << 20) == data.array, "the healthy region holds the data")
    }

    @Test(arguments: engines)
    func aServerThatFailsWritesFailsOnlyItsRegion(engine: IOEngineKind) throws {
        let client = try client(engine)
        let server = try NBDKit(["--filter=error", "memory", "size=8M", "error-pwrite=EIO", "error-pwrite-rate=100%"])
        let remote = try BlockDevice.open(server.uri)
        let localPath = folder.file("local", size: 8 << 20)
        let local = try BlockDevice.open(localPath)
        let data = AlignedBuffer(count: 64 << 10, pattern: 41)
        let regions = [IORegion(device: local, sector: 0, count: 128), IORegion(device: remote, sector: 0, count: 128)]

        let result = try client.sync(.write, regions: regions, buffer: data.bytes)
        #expect(result.errorBits == .region(1))
        #expect(result.errno(ofRegion: 1) == EIO)
        #expect(fileBytes(localPath, count: 64 << 10) == data.array)
        // Reads still work on that server.
        #expect(try client.sync(.read, regions: [regions[1]], buffer: data.bytes) == .success)
    }

    @Test(arguments: engines)
    func aServerThatFailsReadsReportsEIO(engine: IOEngineKind) throws {
        let client = try client(engine)
        let server = try NBDKit(["--filter=error", "memory", "size=8M", "error-pread=EIO", "error-pread-rate=100%"])
        let remote = try BlockDevice.open(server.uri)
        let buffer = AlignedBuffer(count: 4096)
        let result = try client.sync(.read, regions: [IORegion(device: remote, sector: 8, count: 8)], buffer: buffer.bytes)
        #expect(result.errorBits == .region(0))
        #expect(result.errno(ofRegion: 0) == EIO)
        #expect(result.description == "error bits 0x1: region 0: Input/output error (EIO)")
    }

    @Test(arguments: engines)
    func aKilledServerFailsItsRegionAndNothingHangs(engine: IOEngineKind) throws {
        let client = try client(engine)
        let server = try NBDKit(["memory", "size=8M"])
        let data = AlignedBuffer(count: 4096, pattern: 51)
        let (localPath, regions) = try mirroredOnce(data, to: try BlockDevice.open(server.uri), client: client)

        server.kill()
        let result = try client.sync(.write, regions: regions, buffer: data.bytes)
        #expect(result.errorBits == .region(1))
        #expect(result.errno(ofRegion: 1) != nil)
        #expect(fileBytes(localPath, count: 4096) == data.array)

        // The dead connection's thread must sleep, not spin on a hung-up socket.
        let before = cpuSeconds(ofThreadsNamed: "dmio-nbd-remote")
        usleep(500_000)
        #expect(cpuSeconds(ofThreadsNamed: "dmio-nbd-remote") - before < 0.2)
    }

    @Test(arguments: engines)
    func aServerThatStopsAnsweringFailsItsRegionWithETIMEDOUT(engine: IOEngineKind) throws {
        let client = try client(engine)
        let server = try NBDKit(["memory", "size=8M"])
        let remote = try BlockDevice.open(server.uri, options: DeviceOptions(remoteTimeout: .seconds(1)))
        let data = AlignedBuffer(count: 4096, pattern: 53)
        let (localPath, regions) = try mirroredOnce(data, to: remote, client: client)

        server.freeze()
        let started = ContinuousClock.now
        let result = try client.sync(.write, regions: regions, buffer: data.bytes)
        let waited = ContinuousClock.now - started
        #expect(result.errorBits == .region(1))
        #expect(result.errno(ofRegion: 1) == ETIMEDOUT)
        #expect(waited >= .milliseconds(900) && waited < .seconds(10), "\(waited)")
        #expect(fileBytes(localPath, count: 4096) == data.array)
    }

    @Test func aServerThatAcceptsAndNeverAnswersIsGivenUpAtOpen() throws {
        let server = try NBDKit(["memory", "size=8M"])
        server.freeze()
        let started = ContinuousClock.now
        #expect(throws: DMIOError.remoteFailed(device: server.uri, message: "no answer within 1 s")) {
            try BlockDevice.open(server.uri, options: DeviceOptions(remoteTimeout: .seconds(1)))
        }
        #expect(ContinuousClock.now - started < .seconds(10))
    }
}


/// Remote exports that lack a feature get it emulated, correctly.
@Suite struct RemoteEmulationTests {
    @Test(arguments: engines)
    func zeroingAServerThatCannotZeroCoversTheWholeRange(engine: IOEngineKind) throws {
        let client = try client(engine)
        let server = try NBDKit(["--filter=nozero", "memory", "size=160M"])
        let remote = try BlockDevice.open(server.uri)
        let data = AlignedBuffer(count: 1 << 20, pattern: 17)
        let last = IORegion(device: remote, sector: (130 << 20) / 512, count: 2048)
        #expect(try client.sync(.write, regions: [last], buffer: data.bytes) == .success)
        // 144 MiB: longer than one bio of the zero page can carry.
        #expect(try client.sync(.writeZeroes, regions: [IORegion(device: remote, sector: 0, count: (144 << 20) / 512)]) == .success)
        let back = AlignedBuffer(count: 1 << 20, pattern: 1)
        #expect(try client.sync(.read, regions: [last], buffer: back.bytes) == .success)
        #expect(back.array.allSatisfy { $0 == 0 })
    }

    /// What a mirror offers trim by: zeroing that may unmap is cheap on a
    /// file, on a block device with a write-zeroes command, and on an NBD
    /// server that has WRITE_ZEROES.
    @Test func cheapZeroingIsReportedPerDevice() throws {
        let folder = TemporaryFolder()
        let image = folder.file("image", size: 8 << 20)
        let loop = try LoopDevice(file: folder.file("backing", size: 1 << 20))
        let withZero = try NBDKit(["memory", "size=8M"])
        let withoutZero = try NBDKit(["--filter=nozero", "memory", "size=8M"])
        #expect(try BlockDevice.open(image).zeroesCheaply)
        #expect(try BlockDevice.open(loop.path).zeroesCheaply)
        #expect(try BlockDevice.open(withZero.uri).zeroesCheaply)
        #expect(try !BlockDevice.open(withoutZero.uri).zeroesCheaply)
    }

    @Test(arguments: engines)
    func aFUAWriteToAServerWithoutFUAIsFlushedAndCompletes(engine: IOEngineKind) throws {
        let client = try client(engine)
        let folder = TemporaryFolder()
        let image = folder.file("image", size: 8 << 20)
        // nbdkit's eval plugin over a file: flush, but no FUA.
        let server = try NBDKit([
            "eval", "get_size=echo \(8 << 20)",
            "pread=dd if=\(image) skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
            "pwrite=dd of=\(image) seek=$4 oflag=seek_bytes conv=notrunc status=none",
            "can_write=exit 0", "can_flush=exit 0", "flush=sync \(image)", "can_fua=echo none"])
        let remote = try BlockDevice.open(server.uri)
        let data = AlignedBuffer(count: 4096, pattern: 23)
        let region = IORegion(device: remote, sector: 8, count: 8)
        for _ in 0..<3 {
            #expect(try client.sync(.write, regions: [region], buffer: data.bytes, flags: .fua) == .success)
        }
        let back = AlignedBuffer(count: 4096)
        #expect(try client.sync(.read, regions: [region], buffer: back.bytes) == .success)
        #expect(back.array == data.array)
    }
}

/// CPU time (user + system) of this process's threads called `name`.
private func cpuSeconds(ofThreadsNamed name: String) -> Double {
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
    var ticks = 0
    for task in tasks {
        guard let comm = try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8),
              comm.trimmingCharacters(in: .whitespacesAndNewlines) == name,
              let stat = try? String(contentsOfFile: "/proc/self/task/\(task)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { continue }
        // Fields after the command name: state is 3rd, utime 14th, stime 15th.
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        ticks += (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0)
    }
    return Double(ticks) / Double(sysconf(Int32(_SC_CLK_TCK)))
}
