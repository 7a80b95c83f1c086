import Glibc

/// The two files both DMIO and fio work on, written in full once so that reads
/// hit data rather than holes. They are removed by `remove()`, and on
/// SIGINT, SIGTERM or SIGHUP, which would otherwise leave gigabytes in
/// /dev/shm.
final class BackingFiles {
    let paths: [String]
    let size: Int

    init(directory: String, size: Int) throws {
        self.size = size
        paths = ["a", "b"].map { "\(directory)/dmio-bench-\(getpid())-\($0)" }
        RemoveOnSignal.install(paths)
        do {
            for path in paths { try Self.fill(path, size: size) }
        } catch {
            remove()
            throw error
        }
    }

    func remove() {
        for path in paths { unlink(path) }
    }

    private static func fill(_ path: String, size: Int) throws {
        let fd = open(path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw BenchError("cannot create \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var random = Xorshift(seed: UInt64(size))
        let chunk = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: mebibyte / 8)
        defer { chunk.deallocate() }
        for index in chunk.indices { chunk[index] = random.next() }
        var offset = 0
        while offset < size {
            let length = min(mebibyte, size - offset)
            let written = pwrite(fd, chunk.baseAddress, length, off_t(offset))
            guard written > 0 else {
                throw BenchError("cannot write \(path): \(written < 0 ? String(cString: strerror(errno)) : "no space")")
            }
            offset += written
        }
    }
}

/// Unlinks the backing files from a signal handler, which may call only
/// async-signal-safe functions: the paths are C strings made beforehand.
private enum RemoveOnSignal {
    nonisolated(unsafe) static var paths: [UnsafeMutablePointer<CChar>] = []

    static func install(_ newPaths: [String]) {
        paths = newPaths.map { strdup($0) }
        for signalNumber in [SIGINT, SIGTERM, SIGHUP] {
            signal(signalNumber) { signalNumber in
                for path in RemoveOnSignal.paths { unlink(path) }
                _exit(128 + signalNumber)
            }
        }
    }
}
