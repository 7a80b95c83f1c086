import Glibc

/// Keeps one mirror from being opened by two processes at once: two servers
/// on the same legs would each write data and metadata under the other. An
/// exclusive flock on a file named after the mirror's UUID, held while the
/// mirror is open; the kernel releases it when the process ends, however it
/// ends, so a crash leaves no stale lock.
final class MirrorLock: @unchecked Sendable {
    private let descriptor: Int32

    /// /run/lock where it is writable (every user may lock there on Debian),
    /// else the temporary folder.
    static func path(for mirror: MirrorUUID) -> String {
        let folder = access("/run/lock", W_OK) == 0 ? "/run/lock" : "/tmp"
        return "\(folder)/dmio-nbd-\(mirror).lock"
    }

    init(_ mirror: MirrorUUID) throws(MirrorError) {
        let path = Self.path(for: mirror)
        // Read-only: a lock file another user made first can still be locked.
        descriptor = open(path, O_RDONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o644)
        guard descriptor >= 0 else { throw .metadataIO(leg: path, errno: errno) }
        guard flock(descriptor, LOCK_EX | LOCK_NB) == 0 else {
            close(descriptor)
            throw .inUse(mirror: mirror, lock: path)
        }
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
