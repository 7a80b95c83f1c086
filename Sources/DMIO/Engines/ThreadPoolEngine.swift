import Glibc

/// Blocking system calls on a pool of threads. Used where io_uring is not
/// available, and by the io_uring engine for the block-device ioctls that
/// io_uring cannot issue.
final class ThreadPoolEngine: IOEngine, @unchecked Sendable {
    let kind = IOEngineKind.threads
    private let lock = ConditionLock()
    private var queue = BioBatch()
    private var stopping = false
    private var threads: [pthread_t] = []

    init(threads count: Int) {
        for index in 0..<max(1, count) {
            threads.append(startThread(named: "dmio-io-\(index)") { [self] in work() })
        }
    }

    func submit(_ batch: BioBatch) {
        lock.withLock { queue.append(contentsOf: batch) }
        lock.broadcast()
    }

    /// Bios reach the workers as they are submitted: nothing waits for a plug.
    func flushPlugged() {}

    func shutdown() {
        lock.withLock { stopping = true }
        lock.broadcast()
        for thread in threads { pthread_join(thread, nil) }
        threads.removeAll()
    }

    private func work() {
        while true {
            lock.lock()
            while queue.isEmpty && !stopping { lock.wait() }
            guard let bio = queue.popFirst() else {
                lock.unlock()
                return
            }
            lock.unlock()
            // A short transfer or a fallback goes round again on this thread.
            while !bio.absorb(result: performBlocking(bio)) {}
        }
    }
}
