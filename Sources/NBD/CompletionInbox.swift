import Glibc
import NIOConcurrencyHelpers
import NIOCore

/// Brings target completions from storage threads back to its owner's
/// event loop: the first completion of a batch schedules one task, which
/// delivers every completion queued by then and then calls `afterBatch`
/// once.
///
/// A completion is a value, not a closure: the two functions that handle
/// them are given once, and capture nothing (what they need is in the value,
/// or the owner), so a request's completion allocates nothing here, and the
/// queue keeps its storage from one batch to the next. The inbox holds its
/// owner from `attach` to `detach`, so that a request's completion need
/// hold nothing but the inbox: the owner detaches once no completion can
/// come (it is gone, with nothing in flight).
final class CompletionInbox<Completion, Owner: AnyObject>: @unchecked Sendable {
    private let lock = NIOLock()
    private var queued: [Completion] = []
    /// The storage the next batch is swapped in with. Touched on the event loop only.
    private var spare: [Completion] = []
    /// Touched on the event loop only.
    private var afterBatchScheduled = false
    private let deliver: (Owner, Completion) -> Void
    private let afterBatch: (Owner) -> Void
    /// Set on the loop before any post, cleared on it after the last; the
    /// unmanaged copy hands it to `deliver` without counting.
    private var owner: Owner?
    private var ownerReference: Unmanaged<Owner>?
    private var loop: EventLoop?
    /// The loop's thread, to tell a post made on it (as `inEventLoop` does,
    /// without a reference to count).
    private var loopThread = pthread_t()

    init(deliver: @escaping (Owner, Completion) -> Void, afterBatch: @escaping (Owner) -> Void) {
        self.deliver = deliver
        self.afterBatch = afterBatch
    }

    func attach(_ owner: Owner, loop: EventLoop) {
        self.owner = owner
        ownerReference = Unmanaged.passUnretained(owner)
        self.loop = loop
        loopThread = pthread_self()
    }

    /// Lets the owner go: no completion may be posted after this. The
    /// owner may be inside a delivery (its last completion detaches it):
    /// it goes once that has returned.
    func detach() {
        let departing = owner
        owner = nil
        ownerReference = nil
        loop?.execute { withExtendedLifetime(departing) {} }
        loop = nil
    }

    /// Delivers `completion` on the owner's loop, then calls `afterBatch`
    /// once for the batch. A completion already on the loop (reaped by the
    /// loop itself) is delivered at once; others queue, and the first of a
    /// batch schedules the delivery. Call `attach` on the loop's thread.
    func post(_ completion: Completion) {
        guard let ownerReference else { return assertionFailure("a completion posted to a detached inbox") }
        if pthread_equal(pthread_self(), loopThread) != 0 {
            ownerReference._withUnsafeGuaranteedRef { deliver($0, completion) }
            if !afterBatchScheduled, let loop {
                afterBatchScheduled = true
                loop.execute { [self] in
                    afterBatchScheduled = false
                    if let owner { afterBatch(owner) }
                }
            }
            return
        }
        let first = lock.withLock {
            queued.append(completion)
            return queued.count == 1
        }
        guard first, let loop else { return }
        loop.execute { [self] in
            var batch = spare
            spare = []
            lock.withLock { swap(&queued, &batch) }
            // Each completion was posted while attached: the owner is here.
            guard let owner else { return assertionFailure("completions queued for a detached inbox") }
            for completion in batch { deliver(owner, completion) }
            afterBatch(owner)
            batch.removeAll(keepingCapacity: true)
            spare = batch
        }
    }
}
