import NIOConcurrencyHelpers
import NIOCore

/// Brings target completions from storage threads back to the event loop:
/// the first completion of a batch schedules one task, which runs every
/// completion queued by then and then `afterBatch` once.
final class CompletionInbox: @unchecked Sendable {
    private let lock = NIOLock()
    private var queued: [() -> Void] = []
    /// Touched on the event loop only.
    private var afterBatchScheduled = false

    /// Runs `completion` on `loop`, then `afterBatch` once for the batch. A
    /// completion already on the loop (reaped by the loop itself) runs at
    /// once; others queue, and the first of a batch schedules the run.
    func post(on loop: EventLoop, _ completion: @escaping () -> Void, afterBatch: @escaping () -> Void) {
        if loop.inEventLoop {
            completion()
            if !afterBatchScheduled {
                afterBatchScheduled = true
                loop.execute { [self] in
                    afterBatchScheduled = false
                    afterBatch()
                }
            }
            return
        }
        let first = lock.withLock {
            queued.append(completion)
            return queued.count == 1
        }
        guard first else { return }
        loop.execute { [self] in
            let batch = lock.withLock {
                defer { queued = [] }
                return queued
            }
            for completion in batch { completion() }
            afterBatch()
        }
    }
}
