import DMIO
import Foundation
import Testing

/// Requests that break the rules are refused with an error that names the
/// device and the cause, and write nothing.
@Suite struct RequestRuleTests {
    let folder = TemporaryFolder()

    @Test(arguments: engines)
    func regionCountsOutsideTheRulesAreRefused(engine: IOEngineKind) throws {
        let client = try client(engine)
        let device = try folder.device("disk", size: 1 << 20)
        let buffer = AlignedBuffer(count: 4096)
        let one = IORegion(device: device, sector: 0, count: 8)

        expectError(.invalidRegionCount(operation: .read, count: 2)) {
            _ = try client.sync(.read, regions: [one, one], buffer: buffer.bytes)
        }
        expectError(.invalidRegionCount(operation: .read, count: 0)) {
            _ = try client.sync(.read, regions: [], buffer: buffer.bytes)
        }
        expectError(.invalidRegionCount(operation: .write, count: 0)) {
            _ = try client.sync(.write, regions: [], buffer: buffer.bytes)
        }
        expectError(.invalidRegionCount(operation: .write, count: 65)) {
            _ = try client.sync(.write, regions: Array(repeating: one, count: 65), buffer: buffer.bytes)
        }
        expectError(.memoryMissing(operation: .write)) {
            _ = try client.sync(.write, regions: [one])
        }
        expectError(.memoryTooSmall(neededBytes: 8192, availableBytes: 4096)) {
            _ = try client.sync(.write, regions: [IORegion(device: device, sector: 0, count: 16)], buffer: buffer.bytes)
        }
        expectError(.invalidMemory("page-list offset 4096 is outside the first page")) {
            _ = try client.sync(.write, regions: [one], pages: client.allocatePages(3), offset: 4096)
        }
    }

    @Test(arguments: engines)
    func regionsOfCountZeroAreSkipped(engine: IOEngineKind) throws {
        let client = try client(engine)
        let path = folder.file("disk", size: 1 << 20)
        let device = try BlockDevice.open(path)
        let data = AlignedBuffer(count: 4096, pattern: 5)
        // The empty region even points past the end: it is not looked at.
        let regions = [IORegion(device: device, sector: 1 << 40, count: 0), IORegion(device: device, sector: 8, count: 8)]
        #expect(try client.sync(.write, regions: regions, buffer: data.bytes) == .success)
        #expect(fileBytes(path, offset: 4096, count: 4096) == data.array)
        #expect(fileBytes(path, count: 4096) == [UInt8](repeating: 0, count: 4096))
    }

    @Test(arguments: engines)
    func aRegionPastTheEndRefusesTheWholeWrite(engine: IOEngineKind) throws {
        let client = try client(engine)
        let a = try folder.device("a", size: 1 << 20)
        let b = try folder.device("b", size: 64 << 10)
        let data = AlignedBuffer(count: 8192, pattern: 1)

        expectError(.beyondEnd(device: b.name, sector: 120, count: 16, deviceSectors: 128)) {
            _ = try client.sync(.write, regions: [IORegion(device: a, sector: 0, count: 16),
                                                  IORegion(device: b, sector: 120, count: 16)], buffer: data.bytes)
        }
        expectError(.beyondEnd(device: b.name, sector: UInt64.max - 1, count: 16, deviceSectors: 128)) {
            _ = try client.sync(.read, regions: [IORegion(device: b, sector: UInt64.max - 1, count: 16)], buffer: data.bytes)
        }
        #expect(fileBytes(a.name, count: 8192) == [UInt8](repeating: 0, count: 8192), "nothing written to a")
        #expect(allocatedBytes(a.name) == 0)
    }

    @Test func aDeviceSpecIsAPathOrAURIOfAKnownScheme() throws {
        #expect(try DeviceSpec("/srv/a.img") == .path("/srv/a.img"))
        #expect(try DeviceSpec("legs/a.img") == .path("legs/a.img"))
        for scheme in ["nbd", "nbds", "nbd+unix", "nbds+unix"] {
            let uri = "\(scheme)://host/export"
            #expect(try DeviceSpec(uri) == .uri(uri, scheme: scheme))
        }
        expectError(.invalidDeviceSpec("rbd://pool/image")) { _ = try DeviceSpec("rbd://pool/image") }
        #expect(DeviceSpec.isURI("rbd://pool/image"))
        #expect(!DeviceSpec.isURI("/dev/sdb"))
    }

    /// `connections=N` is dmio's: taken out of the URI libnbd gets, the
    /// other parameters left as they were, in their order.
    @Test func aURIsConnectionCountIsTakenOutOfIt() throws {
        #expect(try DeviceSpec("nbd+unix:///?socket=/run/x.sock&connections=2")
                == .uri("nbd+unix:///?socket=/run/x.sock", scheme: "nbd+unix", connections: 2))
        #expect(try DeviceSpec("nbd://host:10809/export?connections=4")
                == .uri("nbd://host:10809/export", scheme: "nbd", connections: 4))
        #expect(try DeviceSpec("nbds://h/e?tls-certificates=/pki&connections=16&tls-verify-peer=false")
                == .uri("nbds://h/e?tls-certificates=/pki&tls-verify-peer=false", scheme: "nbds", connections: 16))
        // A parameter that only begins with the name is libnbd's.
        #expect(try DeviceSpec("nbd://h/e?connections-x=1") == .uri("nbd://h/e?connections-x=1", scheme: "nbd"))
        for bad in ["connections=0", "connections=17", "connections=", "connections", "connections=two",
                    "connections=-1"] {
            let uri = "nbd+unix:///?socket=/run/x.sock&\(bad)"
            expectError(.invalidDeviceParameter(device: uri, why: "\(bad): the connections to a remote device are "
                                                + "a number from 1 to 16")) { _ = try DeviceSpec(uri) }
        }
        let twice = "nbd://h/e?connections=2&connections=2"
        expectError(.invalidDeviceParameter(device: twice, why: "connections is given twice")) { _ = try DeviceSpec(twice) }
        // Refused before anything is opened, naming the device as given.
        let refused = "nbd+unix:///?socket=/nonexistent.sock&connections=99"
        expectError(.invalidDeviceParameter(device: refused, why: "connections=99: the connections to a remote device "
                                            + "are a number from 1 to 16")) { _ = try BlockDevice.open(refused) }
        #expect(DMIOError.invalidDeviceParameter(device: "nbd://h/e?connections=0", why: "w").description
                == "nbd://h/e?connections=0: w")
    }

    @Test func errorsNameTheDeviceAndTheCause() throws {
        let missing = folder.path + "/no-such-leg"
        expectError(.openFailed(device: missing, errno: ENOENT)) { _ = try BlockDevice.open(missing) }
        #expect(DMIOError.openFailed(device: missing, errno: ENOENT).description
                == "\(missing): No such file or directory (ENOENT)")
        expectError(.openFailed(device: folder.path, errno: EISDIR)) { _ = try BlockDevice.open(folder.path) }
        expectError(.invalidDeviceSpec("http://example/disk")) { _ = try BlockDevice.open("http://example/disk") }
        #expect(DMIOError.beyondEnd(device: "/dev/x", sector: 8, count: 8, deviceSectors: 10).description
                == "/dev/x: sectors 8+8 reach past the device's end (10 sectors)")
    }

    @Test func createMakesAMissingSparseFile() throws {
        let path = folder.path + "/new-leg"
        let device = try BlockDevice.open(path, options: DeviceOptions(createSize: 8 << 20))
        #expect(device.size == 8 << 20)
        #expect(allocatedBytes(path) == 0)
    }

    @Test(arguments: engines)
    func aReadOnlyDeviceRefusesWritesAndTheOtherRegionsAreUntouched(engine: IOEngineKind) throws {
        let client = try client(engine)
        let a = try folder.device("a", size: 1 << 20)
        let b = try folder.device("b", size: 1 << 20, options: DeviceOptions(readOnly: true))
        let data = AlignedBuffer(count: 4096, pattern: 2)
        let regions = [IORegion(device: a, sector: 0, count: 8), IORegion(device: b, sector: 0, count: 8)]

        for operation in [IOOperation.write, .discard, .writeZeroes, .flush] {
            expectError(.readOnlyDevice(device: b.name, operation: operation)) {
                _ = try client.sync(operation, regions: regions, buffer: data.bytes)
            }
        }
        #expect(allocatedBytes(a.name) == 0, "nothing written to the writable region")
        #expect(try client.sync(.read, regions: [regions[1]], buffer: data.bytes) == .success)
    }

    /// A file on a read-only mount: opening it for writing is refused by the
    /// kernel, and the error says so.
    @Test func aFileOnAReadOnlyMountCannotBeOpenedForWriting() throws {
        let inner = folder.path + "/data"
        try FileManager.default.createDirectory(atPath: inner, withIntermediateDirectories: false)
        #expect(FileManager.default.createFile(atPath: inner + "/leg", contents: Data(count: 4096)))
        let view = try ReadOnlyView(of: inner)
        let path = view.path + "/leg"
        expectError(.openFailed(device: path, errno: EROFS)) { _ = try BlockDevice.open(path) }
        #expect(try BlockDevice.open(path, options: DeviceOptions(readOnly: true)).isReadOnly)
    }

    @Test(arguments: engines)
    func directIORefusesMisalignedRegionsAndBouncesMisalignedMemory(engine: IOEngineKind) throws {
        let client = try client(engine)
        let path = folder.file("direct", size: 1 << 20)
        let device = try BlockDevice.open(path, options: DeviceOptions(direct: true))
        #expect(device.blockSize == 4096)
        let data = AlignedBuffer(count: 8192 + 1, pattern: 4)

        expectError(.misaligned(device: path, sector: 1, count: 8, blockSize: 4096)) {
            _ = try client.sync(.write, regions: [IORegion(device: device, sector: 1, count: 8)], buffer: data.bytes)
        }
        expectError(.misaligned(device: path, sector: 8, count: 4, blockSize: 4096)) {
            _ = try client.sync(.write, regions: [IORegion(device: device, sector: 8, count: 4)], buffer: data.bytes)
        }
        // Memory one byte off a page boundary: O_DIRECT alone would fail with
        // EINVAL; DMIO copies through an aligned buffer instead.
        let unaligned = UnsafeMutableRawBufferPointer(rebasing: data.bytes[1...])
        let region = IORegion(device: device, sector: 8, count: 16)
        #expect(try client.sync(.write, regions: [region], buffer: unaligned) == .success)
        #expect(fileBytes(path, offset: 4096, count: 8192) == Array(unaligned))
        let back = AlignedBuffer(count: 8192 + 1)
        let target = UnsafeMutableRawBufferPointer(rebasing: back.bytes[1...])
        #expect(try client.sync(.read, regions: [region], buffer: target) == .success)
        #expect(Array(target) == Array(unaligned))
    }
}
