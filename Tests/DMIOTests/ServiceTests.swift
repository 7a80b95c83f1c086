import DMIO
import Foundation
import TestSupport
import Testing

/// The seed's service: every call, in every memory type and form, on both
/// engines, checked by reading the bytes back.
@Suite struct ServiceTests {
    @Test(arguments: engines, MemoryKind.allCases)
    func writeToSeveralRegionsThenReadEachBack(engine: IOEngineKind, kind: MemoryKind) async throws {
        let folder = TemporaryFolder()
        let client = try client(engine)
        let a = try folder.device("a", size: 4 << 20)
        let b = try folder.device("b", size: 4 << 20)
        let count = 24 * 1024 + 512  // spans pages unevenly
        let sectors = UInt64(count / sectorSize)

        for (round, form) in CallForm.allCases.enumerated() {
            let data = AlignedBuffer(count: count, pattern: UInt8(round + 1)).array
            let source = MemoryFixture(kind, count: count, client: client)
            source.load(data)
            // Three regions: two devices, and a second place on the first.
            let regions = [IORegion(device: a, sector: 8, count: sectors),
                           IORegion(device: b, sector: 1000, count: sectors),
                           IORegion(device: a, sector: 4096, count: sectors)]
            let written = try await perform(client, form, .write, regions, memory: source.memory)
            #expect(written == .success, "\(form)")

            for (index, region) in regions.enumerated() {
                let target = MemoryFixture(kind, count: count, client: client)
                let read = try await perform(client, form, .read, [region], memory: target.memory)
                #expect(read == .success, "\(form) region \(index)")
                #expect(target.contents() == data, "\(form) region \(index) read back")
                let path = region.device === a ? a.name : b.name
                #expect(fileBytes(path, offset: Int(region.byteOffset), count: count) == data,
                        "\(form) region \(index) on disk")
            }
        }
    }

    @Test(arguments: engines)
    func memoryTypesGiveIdenticalBytes(engine: IOEngineKind) throws {
        let folder = TemporaryFolder()
        let client = try client(engine)
        let device = try folder.device("disk", size: 1 << 20)
        let count = 40 * 512
        let data = AlignedBuffer(count: count, pattern: 9).array
        let region = IORegion(device: device, sector: 64, count: UInt64(count / sectorSize))

        for writer in MemoryKind.allCases {
            let source = MemoryFixture(writer, count: count, client: client)
            source.load(data)
            #expect(try client.sync(.write, regions: [region], memory: source.memory) == .success)
            for reader in MemoryKind.allCases {
                let target = MemoryFixture(reader, count: count, client: client)
                #expect(try client.sync(.read, regions: [region], memory: target.memory) == .success)
                #expect(target.contents() == data, "written as \(writer), read as \(reader)")
            }
        }
    }

    /// The seed: bio vectors let a caller "direct different portions of the
    /// bio to different devices".
    @Test(arguments: engines)
    func bioVectorsSendPartsOfOneBufferToDifferentDevices(engine: IOEngineKind) throws {
        let folder = TemporaryFolder()
        let client = try client(engine)
        let a = try folder.device("a", size: 1 << 20)
        let b = try folder.device("b", size: 1 << 20)
        let buffer = AlignedBuffer(count: 16 * 1024, pattern: 3)
        let base = buffer.bytes.baseAddress!
        let vectors = [BioVec(page: base, offset: 0, length: 4096), BioVec(page: base, offset: 4096, length: 4096),
                       BioVec(page: base + 8192, offset: 0, length: 8192)]

        #expect(try client.sync(.write, regions: [IORegion(device: a, sector: 0, count: 16)],
                                bioVectors: Array(vectors[0...1])) == .success)
        #expect(try client.sync(.write, regions: [IORegion(device: b, sector: 0, count: 16)],
                                bioVectors: Array(vectors[2...])) == .success)
        #expect(fileBytes(a.name, count: 8192) == Array(buffer.array[0..<8192]))
        #expect(fileBytes(b.name, count: 8192) == Array(buffer.array[8192...]))
    }

    @Test(arguments: engines)
    func aWriteReachesSixtyFourRegions(engine: IOEngineKind) throws {
        let folder = TemporaryFolder()
        let client = try client(engine)
        let paths = (0..<8).map { folder.file("leg\($0)", size: 1 << 20) }
        let devices = try paths.map { try BlockDevice.open($0) }
        let regions = (0..<64).map { IORegion(device: devices[$0 % 8], sector: UInt64($0 / 8) * 16, count: 8) }
        let data = AlignedBuffer(count: 4096, pattern: 64)

        #expect(try client.sync(.write, regions: regions, buffer: data.bytes) == .success)
        for (index, path) in paths.enumerated() {
            for slot in 0..<8 {
                #expect(fileBytes(path, offset: slot * 16 * 512, count: 4096) == data.array, "leg \(index) slot \(slot)")
            }
        }
    }

    @Test(arguments: engines)
    func largeRequestsSplitIntoManyBios(engine: IOEngineKind) throws {
        let folder = TemporaryFolder()
        let client = try client(engine)
        let path = folder.file("disk", size: 32 << 20)
        let device = try BlockDevice.open(path)
        let count = 9 << 20  // more than two 4 MiB bios
        let data = AlignedBuffer(count: count, pattern: 77)
        let region = IORegion(device: device, sector: 1, count: UInt64(count / sectorSize))

        #expect(try client.sync(.write, regions: [region], buffer: data.bytes) == .success)
        let back = AlignedBuffer(count: count)
        #expect(try client.sync(.read, regions: [region], buffer: back.bytes) == .success)
        #expect(back.array == data.array)
        #expect(fileBytes(path, offset: 512, count: count) == data.array)
    }

    @Test func automaticEngineIsIOUringWhereTheKernelAllowsIt() throws {
        #expect(try DMIOClient().engineKind == .ioUring)
    }

    /// With the kernel's io_uring_disabled at 1, io_uring_setup fails with
    /// EPERM for unprivileged processes (as in containers that forbid it),
    /// while this root process and the tests beside it keep their rings.
    /// The example program, run as nobody, must fall back to threads.
    @Test(.enabled(if: getuid() == 0 && FileManager.default.isWritableFile(atPath: "/proc/sys/kernel/io_uring_disabled"),
                   "needs root and the io_uring_disabled sysctl (Linux 6.6+)"))
    func withoutIOUringTheAutomaticEngineFallsBackToThreads() throws {
        let sysctl = "/proc/sys/kernel/io_uring_disabled"
        let folder = TemporaryFolder()
        chmod(folder.path, 0o777)
        let before = try String(contentsOfFile: sysctl, encoding: .utf8)
        try "1".write(toFile: sysctl, atomically: false, encoding: .utf8)
        defer { try? before.write(toFile: sysctl, atomically: false, encoding: .utf8) }
        let files = ["source", "a", "b"].map { "\(folder.path)/\($0)" }
        for file in files { _ = folder.file(URL(fileURLWithPath: file).lastPathComponent, size: 1 << 20) }
        for file in files { chmod(file, 0o666) }
        let output = try run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              builtExecutable("dmio-copy-example")] + files)
        #expect(output.contains("engine threads"), "\(output)")
        #expect(output.contains("error bits 0x0 (ok)"), "\(output)")
    }
}
