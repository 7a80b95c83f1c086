import DMIO

/// Writes a piece of state durably, many requests at a time: a request is
/// answered by the first commit that starts after it (that commit carries
/// everything changed before the request), and requests that arrive while a
/// commit runs share the next one. The superblocks and the bitmap pages are
/// each written this way, so a burst of writes to new regions costs one
/// metadata write, not one each.
final class GroupCommit: @unchecked Sendable {
    /// Writes the current state, then calls its argument with whether the
    /// state is durable, and whether writing it changed it (a leg failed the
    /// write): then another commit follows. It may call back before it
    /// returns.
    typealias Commit = (_ done: @escaping @Sendable (_ durable: Bool, _ changedState: Bool) -> Void) -> Void

    private let lock = ConditionLock()
    private let commit: Commit
    private var waiting: [@Sendable (Bool) -> Void] = []
    private var running = false

    init(_ commit: @escaping Commit) {
        self.commit = commit
    }

    /// Calls `then` once a commit that started after this call has ended.
    func request(then: @escaping @Sendable (Bool) -> Void) {
        let start = lock.withLock {
            waiting.append(then)
            if running { return false }
            running = true
            return true
        }
        if start { drive() }
    }

    /// Waits for a commit; for threads that may block.
    func commitAndWait() -> Bool {
        waitForCallback { request(then: $0) }
    }

    /// Runs commits until no request waits. A commit that ends inside
    /// `commit` is followed in this loop, not by recursion.
    private func drive() {
        final class Round: @unchecked Sendable {
            var insideCommit = true
            var endedInside = false
        }
        while true {
            let waiters: [@Sendable (Bool) -> Void]? = lock.withLock {
                if waiting.isEmpty {
                    running = false
                    return nil
                }
                let taken = waiting
                waiting = []
                return taken
            }
            guard let waiters else { return }
            let round = Round()
            commit { [self] durable, changedState in
                for waiter in waiters { waiter(durable) }
                let continueHere = lock.withLock {
                    // Nobody waits for the change: it goes on record all the same.
                    if changedState && waiting.isEmpty { waiting.append { _ in } }
                    if round.insideCommit { round.endedInside = true }
                    return !round.insideCommit
                }
                if continueHere { drive() }
            }
            let endedInside = lock.withLock {
                round.insideCommit = false
                return round.endedInside
            }
            if !endedInside { return }
        }
    }
}

/// Runs `body` and blocks until it calls back with a result.
func waitForCallback(_ body: (@escaping @Sendable (Bool) -> Void) -> Void) -> Bool {
    let lock = ConditionLock()
    nonisolated(unsafe) var result: Bool?
    body { value in
        lock.withLock { result = value }
        lock.signal()
    }
    lock.lock()
    while result == nil { lock.wait() }
    lock.unlock()
    return result!
}
