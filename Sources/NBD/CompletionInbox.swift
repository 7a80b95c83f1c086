import NIOConcurrencyHelpers
import NIOCore

/// Brings target completions from storage threads back to the event loop:
/// the first completion of a batch schedules one task, which delivers every
/// completion queued by then and then calls `afterBatch` once, with the
/// owner the last completion was posted from.
///
/// A completion is a value, not a closure: the two functions that handle
/// them are given once, and capture nothing (what they need is in the value,
/// or the owner), so a request's completion allocates nothing here, and the
/// queue keeps its storage from one batch to the next. The inbox does not
/// hold its owner: each post brings it.
final class CompletionInbox<Completion, Owner>: @unchecked Sendable {
    private let lock = NIOLock()
    private var queued: [Completion] = []
    private var queuedOwner: Owner?
    /// The storage the next batch is swapped in with. Touched on the event loop only.
    private var spare: [Completion] = []
    /// Touched on the event loop only.
    private var afterBatchScheduled = false
    private let deliver: (Completion) -> Void
    private let afterBatch: (Owner) -> Void

    init(deliver: @escaping (Completion) -> Void, afterBatch: @escaping (Owner) -> Void) {
        self.deliver = deliver
        self.afterBatch = afterBatch
    }

    /// Delivers `completion` on `loop`, then calls `afterBatch` once for the
    /// batch. A completion already on the loop (reaped by the loop itself)
    /// is delivered at once; others queue, and the first of a batch
    /// schedules the delivery.
    func post(_ completion: Completion, from owner: Owner, on loop: EventLoop) {
        if loop.inEventLoop {
            deliver(completion)
            if !afterBatchScheduled {
                afterBatchScheduled = true
                loop.execute { [self] in
                    afterBatchScheduled = false
                    afterBatch(owner)
                }
            }
            return
        }
        let first = lock.withLock {
            queued.append(completion)
            queuedOwner = owner
            return queued.count == 1
        }
        guard first else { return }
        loop.execute { [self] in
            var batch = spare
            spare = []
            let owner = lock.withLock {
                swap(&queued, &batch)
                defer { queuedOwner = nil }
                return queuedOwner
            }
            for completion in batch { deliver(completion) }
            if let owner { afterBatch(owner) }
            batch.removeAll(keepingCapacity: true)
            spare = batch
        }
    }
}
