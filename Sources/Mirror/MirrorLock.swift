import Glibc

/// Keeps one mirror from being opened by two processes at once: two servers
/// on the same legs would each write data and metadata under the other. An
/// exclusive flock on a file named after the mirror's UUID, held while the
/// mirror is open; the kernel releases it when the process ends, however it
/// ends, so a crash leaves no stale lock.
final class MirrorLock: @unchecked Sendable {
    private let descriptor: Int32

    /// /run/lock where every user may lock (a sticky, world-writable folder,
    /// as on Debian), else the temporary folder: the same for every user of
    /// a machine, so that no two servers look in different places.
    static func path(for mirror: MirrorUUID) -> String {
        var info = stat()
        let shared = stat("/run/lock", &info) == 0 && info.st_mode & 0o1777 == 0o1777
        return "\(shared ? "/run/lock" : "/tmp")/dmio-nbd-\(mirror).lock"
    }

    init(_ mirror: MirrorUUID) throws(MirrorError) {
        let path = Self.path(for: mirror)
        descriptor = Self.openLockFile(path)
        guard descriptor >= 0 else { throw .metadataIO(leg: path, errno: errno) }
        guard flock(descriptor, LOCK_EX | LOCK_NB) == 0 else {
            close(descriptor)
            throw .inUse(mirror: mirror, lock: path)
        }
    }

    /// Opens the lock file read-only (a file another user made is locked
    /// as well), making it if missing; a non-regular file there (a planted
    /// FIFO or device) is refused rather than opened for good.
    private static func openLockFile(_ path: String) -> Int32 {
        let flags = O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK
        var descriptor = open(path, flags)
        if descriptor < 0 && errno == ENOENT {
            descriptor = open(path, flags | O_CREAT | O_EXCL, 0o644)
            if descriptor < 0 && errno == EEXIST { descriptor = open(path, flags) }
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

    /// Whether some process holds `mirror` open now.
    static func isHeld(_ mirror: MirrorUUID) -> Bool {
        do {
            _ = try MirrorLock(mirror)
            return false
        } catch {
            if case .inUse = error { return true }
            return false
        }
    }

    deinit { close(descriptor) }
}
