import CDMIOSupport
import Glibc
import URing

/// Which I/O engine a client uses.
public enum IOEngineKind: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// io_uring through liburing: a batch of bios is one system call.
    case ioUring = "io_uring"
    /// A pool of threads doing blocking system calls: for kernels or
    /// containers where io_uring is missing or forbidden.
    case threads

    public var description: String { rawValue }
}

/// What the client asks for: an engine, or the best one that works here.
public enum IOEngineChoice: Sendable, Hashable {
    /// io_uring when the kernel allows it (not EPERM/ENOSYS, as in some
    /// containers), threads otherwise.
    case automatic
    case only(IOEngineKind)
}

/// Runs bios against local devices and ends each through `Bio.absorb`.
protocol IOEngine: AnyObject, Sendable {
    var kind: IOEngineKind { get }
    /// Starts every bio of `batch`; they complete on the engine's threads.
    func submit(_ batch: BioBatch)
    /// Hands over what a plugged thread queued.
    func flushPlugged()
    /// Waits for in-flight bios, then stops the engine's threads.
    func shutdown()
}

func makeEngine(_ choice: IOEngineChoice, threads: Int) throws(DMIOError) -> IOEngine {
    switch choice {
    case .only(.threads):
        return ThreadPoolEngine(threads: threads)
    case .only(.ioUring):
        do { return try IOUringEngine() } catch {
            throw .engineUnavailable(engine: .ioUring, errno: error.errno)
        }
    case .automatic:
        if let engine = try? IOUringEngine() { return engine }
        return ThreadPoolEngine(threads: threads)
    }
}

/// Carries out one submission of `bio` with blocking system calls. Returns
/// what the system call returned: bytes transferred or 0, or a negative errno.
func performBlocking(_ bio: Bio) -> Int {
    let fd = bio.fd
    let result: Int
    switch bio.command {
    // One buffer (most requests): pread and pwrite, whose kernel path does
    // not import an iovec array (about 5 % of a 4k write's system call on
    // tmpfs).
    case .read:
        let (iovecs, count) = bio.iovecs
        result = count == 1 ? pread(fd, iovecs.pointee.iov_base, iovecs.pointee.iov_len, off_t(bio.offset))
                            : preadv(fd, iovecs, Int32(count), off_t(bio.offset))
    case .write, .zeroWrite:
        let (iovecs, count) = bio.iovecs
        let flags = bio.flags.contains(.fua) ? Linux.writeDataSync : 0
        result = count == 1 && flags == 0
            ? pwrite(fd, iovecs.pointee.iov_base, iovecs.pointee.iov_len, off_t(bio.offset))
            : dmio_pwritev2(fd, iovecs, Int32(count), Int64(bio.offset), flags)
    case .allocate(let mode):
        result = Int(dmio_fallocate(fd, mode, Int64(bio.offset), Int64(bio.remaining)))
    case .sync:
        result = Int(fdatasync(fd))
    case .blockDeviceRange(let request):
        var range: (UInt64, UInt64) = (bio.offset, bio.remaining)
        result = Int(ioctl(fd, request, &range))
    }
    return result < 0 ? -Int(errno) : result
}
