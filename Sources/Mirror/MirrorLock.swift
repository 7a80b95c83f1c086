import DMIO
import Glibc

/// Keeps one mirror from being used by two processes at once: two servers
/// on the same legs (or a server of the mirror and one of a leg served
/// raw) would each write data and metadata under the other. An exclusive
/// flock on a file named after the mirror's UUID, which holds the holder's
/// pid. The kernel drops the lock when the process ends, however it ends;
/// the file is removed when the holder lets go, so that only a crash leaves
/// one behind (and the next holder takes it over).
public final class MirrorLock: @unchecked Sendable {
    private var descriptor: Int32
    private let path: String
    private let lock = ConditionLock()

    /// /run/lock where every user may lock (a sticky, world-writable folder,
    /// as on Debian), else the temporary folder: the same for every user of
    /// a machine, so that no two servers look in different places.
    static func path(for mirror: MirrorUUID) -> String {
        var info = stat()
        let shared = stat("/run/lock", &info) == 0 && info.st_mode & 0o1777 == 0o1777
        return "\(shared ? "/run/lock" : "/tmp")/dmio-nbd-\(mirror).lock"
    }

    /// Takes the lock of `mirror`, or throws `inUse` naming the holder.
    public init(_ mirror: MirrorUUID) throws(MirrorError) {
        path = Self.path(for: mirror)
        while true {
            let descriptor = Self.openLockFile(path)
            guard descriptor >= 0 else { throw .metadataIO(leg: path, errno: errno) }
            guard flock(descriptor, LOCK_EX | LOCK_NB) == 0 else {
                let holder = Self.holder(descriptor)
                close(descriptor)
                throw .inUse(mirror: mirror, lock: path, pid: holder)
            }
            // The last holder may have removed the file between our open and
            // our lock: a lock on a file no longer there protects nothing.
            if Self.isStillAt(path, descriptor) {
                self.descriptor = descriptor
                break
            }
            close(descriptor)
        }
        let pid = Array("\(getpid())\n".utf8)
        if ftruncate(descriptor, 0) == 0 { _ = pwrite(descriptor, pid, pid.count, 0) }
    }

    /// Opens the lock file for writing its pid where this user may (read-only
    /// otherwise: another user's file is locked as well), making it if
    /// missing; a non-regular file there (a planted FIFO or
    /// device) is refused rather than opened for good.
    private static func openLockFile(_ path: String) -> Int32 {
        let flags = O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK
        func openExisting() -> Int32 {
            let descriptor = open(path, flags | O_RDWR)
            return descriptor < 0 && errno == EACCES ? open(path, flags | O_RDONLY) : descriptor
        }
        var descriptor = openExisting()
        if descriptor < 0 && errno == ENOENT {
            descriptor = open(path, flags | O_RDWR | O_CREAT | O_EXCL, 0o644)
            if descriptor < 0 && errno == EEXIST { descriptor = openExisting() }
        }
        guard descriptor >= 0 else { return -1 }
        var info = stat()
        guard fstat(descriptor, &info) == 0, info.st_mode & S_IFMT == S_IFREG else {
            close(descriptor)
            errno = EINVAL
            return -1
        }
        return descriptor
    }

    private static func isStillAt(_ path: String, _ descriptor: Int32) -> Bool {
        var held = stat(), named = stat()
        return fstat(descriptor, &held) == 0 && stat(path, &named) == 0
            && held.st_dev == named.st_dev && held.st_ino == named.st_ino
    }

    /// The pid a lock file holds (nil if it holds none yet).
    private static func holder(_ descriptor: Int32) -> Int32? {
        var bytes = [UInt8](repeating: 0, count: 16)
        let count = pread(descriptor, &bytes, bytes.count, 0)
        guard count > 0 else { return nil }
        return Int32(String(decoding: bytes[0..<count].prefix { $0 != UInt8(ascii: "\n") }, as: UTF8.self))
    }

    /// Removes the file (while the lock is still held, so that no one who
    /// opened it meanwhile takes it for a lock) and lets go. At a clean
    /// stop; later calls do nothing.
    public func release() {
        lock.withLock {
            guard descriptor >= 0 else { return }
            if Self.isStillAt(path, descriptor) { unlink(path) }
            close(descriptor)
            descriptor = -1
        }
    }

    deinit { release() }
}
