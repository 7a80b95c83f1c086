import Glibc

/// Whether the calling thread has plugged its I/O (the kernel's
/// `blk_start_plug`): a thread-local depth, so that plugs may nest.
enum Plug {
    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        precondition(pthread_key_create(&key, nil) == 0, "pthread_key_create")
        return key
    }()

    static var isPlugged: Bool { depth > 0 }

    private static var depth: Int {
        get { Int(bitPattern: pthread_getspecific(key)) }
        set { pthread_setspecific(key, UnsafeRawPointer(bitPattern: newValue)) }
    }

    static func start() { depth += 1 }

    /// Returns true when the outermost plug ended.
    static func finish() -> Bool {
        precondition(depth > 0, "unplug without plug")
        depth -= 1
        return depth == 0
    }
}
