import NIOConcurrencyHelpers
import NIOCore

/// Brings target completions from storage threads back to the event loop:
/// the first completion of a batch schedules one task, which delivers every
/// completion queued by then and then calls `afterBatch` once.
///
/// A completion is a value, not a closure: the two functions that handle
/// them are given once, and capture nothing (what they need is in the
/// value), so a request's completion allocates nothing here, and the queue
/// keeps its storage from one batch to the next.
final class CompletionInbox<Completion>: @unchecked Sendable {
    private let lock = NIOLock()
    private var queued: [Completion] = []
    /// The storage the next batch is swapped in with. Touched on the event loop only.
    private var spare: [Completion] = []
    /// Touched on the event loop only.
    private var afterBatchScheduled = false
    private let deliver: (Completion) -> Void
    private let afterBatch: (Completion) -> Void

    /// `afterBatch` gets the batch's last completion.
    init(deliver: @escaping (Completion) -> Void, afterBatch: @escaping (Completion) -> Void) {
        self.deliver = deliver
        self.afterBatch = afterBatch
    }

    /// Delivers `completion` on `loop`, then calls `afterBatch` once for the
    /// batch. A completion already on the loop (reaped by the loop itself)
    /// is delivered at once; others queue, and the first of a batch
    /// schedules the delivery.
    func post(_ completion: Completion, on loop: EventLoop) {
        if loop.inEventLoop {
            deliver(completion)
            if !afterBatchScheduled {
                afterBatchScheduled = true
                loop.execute { [self] in
                    afterBatchScheduled = false
                    afterBatch(completion)
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
            var batch = spare
            spare = []
            lock.withLock { swap(&queued, &batch) }
            for completion in batch { deliver(completion) }
            if let last = batch.last { afterBatch(last) }
            batch.removeAll(keepingCapacity: true)
            spare = batch
        }
    }
}
