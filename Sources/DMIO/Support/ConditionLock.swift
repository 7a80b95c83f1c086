import CDMIOSupport
import Glibc

/// A pthread mutex with a condition variable. Allocated once and kept, so
/// that waiting and waking on the I/O path never allocates. Public for the
/// services built on DMIO (the mirror), which share its threading model.
/// Timed waits measure the monotonic clock: a step of the wall clock
/// neither stalls nor hurries them.
public final class ConditionLock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>

    public init() {
        mutex = .allocate(capacity: 1)
        condition = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        condition.deallocate()
    }

    @inline(__always)
    public func lock() { pthread_mutex_lock(mutex) }

    @inline(__always)
    public func unlock() { pthread_mutex_unlock(mutex) }

    @inline(__always)
    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Waits for a signal; call with the lock held.
    public func wait() { pthread_cond_wait(condition, mutex) }

    /// Waits for a signal or for `duration`; call with the lock held.
    public func wait(for duration: Duration) {
        var deadline = timespec()
        clock_gettime(CLOCK_MONOTONIC, &deadline)
        let nanoseconds = Int(deadline.tv_nsec) + Int(duration.nanoseconds)
        deadline.tv_sec += nanoseconds / 1_000_000_000
        deadline.tv_nsec = nanoseconds % 1_000_000_000
        pthread_cond_timedwait(condition, mutex, &deadline)
    }

    public func signal() { pthread_cond_signal(condition) }

    public func broadcast() { pthread_cond_broadcast(condition) }
}

/// Blocks the calling thread for `duration` (a thread that may block).
public func pause(for duration: Duration) {
    var request = timespec(tv_sec: Int(duration.components.seconds), tv_nsec: Int(duration.components.attoseconds / 1_000_000_000))
    var left = timespec()
    while nanosleep(&request, &left) != 0 && errno == EINTR { request = left }
}

extension Duration {
    /// The whole duration in nanoseconds.
    public var nanoseconds: Int64 {
        components.seconds * 1_000_000_000 + components.attoseconds / 1_000_000_000
    }

    /// The duration in seconds, for rates and for people.
    public var seconds: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }
}

/// Starts a named, joinable thread running `body`: one the process cannot
/// do without (it stops when the system has no thread to give).
public func startThread(named name: String, _ body: @escaping () -> Void) -> pthread_t {
    switch spawnThread(named: name, detached: false, body) {
    case .success(let thread): return thread
    case .failure(let error): preconditionFailure("pthread_create: \(errnoDescription(error.code))")
    }
}

/// Starts a named thread running `body` that nobody joins (it frees itself
/// when `body` returns); returns the errno when the system has no thread
/// to give, for work the process can refuse (a watcher, a hook).
public func startDetachedThread(named name: String, _ body: @escaping () -> Void) -> Int32? {
    switch spawnThread(named: name, detached: true, body) {
    case .success: nil
    case .failure(let error): error.code
    }
}

private struct ThreadError: Error {
    let code: Int32
}

private func spawnThread(named name: String, detached: Bool,
                         _ body: @escaping () -> Void) -> Result<pthread_t, ThreadError> {
    final class Box {
        let name: String
        let body: () -> Void
        init(_ name: String, _ body: @escaping () -> Void) {
            self.name = name
            self.body = body
        }
    }
    var attributes = pthread_attr_t()
    pthread_attr_init(&attributes)
    defer { pthread_attr_destroy(&attributes) }
    if detached { pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED)) }
    var thread = pthread_t()
    let box = Unmanaged.passRetained(Box(name, body)).toOpaque()
    let rc = pthread_create(&thread, &attributes, { raw in
        let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
        dmio_set_thread_name(box.name)
        box.body()
        return nil
    }, box)
    guard rc == 0 else {
        Unmanaged<AnyObject>.fromOpaque(box).release()
        return .failure(ThreadError(code: rc))
    }
    return .success(thread)
}
