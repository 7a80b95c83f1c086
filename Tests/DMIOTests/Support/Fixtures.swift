import DMIO
import Foundation
import TestSupport
import Testing

/// A temporary folder, removed with everything in it when released.
final class TemporaryFolder {
    let path: String

    /// A new folder inside `base`: /tmp is ext4 here, /dev/shm is tmpfs.
    init(in base: String = "/tmp") {
        var template = Array("\(base)/dmio-test-XXXXXX".utf8CString)
        path = String(cString: mkdtemp(&template)!)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    /// Makes a sparse file of `size` bytes and returns its path.
    func file(_ name: String, size: Int) -> String {
        let file = "\(path)/\(name)"
        precondition(FileManager.default.createFile(atPath: file, contents: nil))
        let fd = open(file, O_WRONLY)
        precondition(fd >= 0 && ftruncate(fd, off_t(size)) == 0)
        close(fd)
        return file
    }

    /// Makes a sparse file and opens it as a device.
    func device(_ name: String, size: Int, options: DeviceOptions = DeviceOptions()) throws -> BlockDevice {
        try BlockDevice.open(file(name, size: size), options: options)
    }
}

/// Page-aligned bytes that tests fill, write from, and read into.
final class AlignedBuffer {
    let bytes: UnsafeMutableRawBufferPointer

    init(count: Int, pattern seed: UInt8? = nil) {
        bytes = allocateAligned(count, zeroed: seed == nil)
        if let seed { fill(seed: seed) }
    }

    deinit { free(bytes.baseAddress) }

    /// Fills with a pattern that differs per seed and per position.
    func fill(seed: UInt8) {
        for index in 0..<bytes.count {
            bytes[index] = UInt8(truncatingIfNeeded: index &* 31 &+ index >> 9 &+ Int(seed) &* 97)
        }
    }

    var array: [UInt8] { Array(bytes) }
}

/// Reads `count` bytes at `offset` of a file with plain pread, bypassing DMIO.
func fileBytes(_ path: String, offset: Int = 0, count: Int) -> [UInt8] {
    let fd = open(path, O_RDONLY)
    defer { close(fd) }
    var data = [UInt8](repeating: 0, count: count)
    let got = data.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
    precondition(got == count, "short read of \(path)")
    return data
}

/// Bytes of the file that are allocated on disk.
func allocatedBytes(_ path: String) -> Int {
    var info = stat()
    precondition(stat(path, &info) == 0)
    return Int(info.st_blocks) * 512
}

/// A tmpfs of a few pages, mounted for the test: writing past its size
/// fails with ENOSPC, a real full disk.
final class SmallTmpfs {
    let path: String
    private let folder = TemporaryFolder()

    init(bytes: Int) throws {
        path = folder.path + "/tmpfs"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
        try run(["mount", "-t", "tmpfs", "-o", "size=\(bytes)", "dmio-test", path])
    }

    deinit { _ = try? run(["umount", "-l", path]) }
}

/// A read-only view (bind mount) of a folder: opening a file in it for
/// writing fails with EROFS.
final class ReadOnlyView {
    let path: String

    init(of source: String) throws {
        path = source + "-ro"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
        try run(["mount", "--bind", "-o", "ro", source, path])
    }

    deinit {
        _ = try? run(["umount", "-l", path])
        try? FileManager.default.removeItem(atPath: path)
    }
}

/// Both engines: parameterised tests run every case on each.
let engines = IOEngineKind.allCases

func client(_ engine: IOEngineKind) throws -> DMIOClient {
    try DMIOClient(engine: .only(engine), pages: 64)
}

/// Expects `body` to throw exactly `expected`.
func expectError(_ expected: DMIOError, _ body: () throws -> Void,
                 sourceLocation: SourceLocation = #_sourceLocation) {
    do {
        try body()
        Issue.record("expected \(expected), nothing was thrown", sourceLocation: sourceLocation)
    } catch {
        #expect(error as? DMIOError == expected, sourceLocation: sourceLocation)
    }
}
