import Synchronization

/// `io_notify_fn`: called once when an asynchronous request completes, with
/// the request's result and the context given at submission. It runs on an
/// engine thread, or inside `submit` when the I/O ended that fast: keep it
/// short and do not block in it.
public typealias IONotify = (IOResult, AnyObject?) -> Void

/// The kernel's `struct io`: one request in flight. It counts its
/// outstanding bios, gathers the error bits (and, beyond the kernel, the
/// errno of each failed region), and reports once when the count reaches 0.
///
/// Jobs are pooled by the client: a steady stream of requests reuses them.
final class IOJob: @unchecked Sendable {
    private let pending = Atomic<Int>(0)
    private let errorBits = Atomic<UInt64>(0)
    /// errno of each region's first failure; written by the completer that
    /// set the region's bit, read after the last completion.
    private let errnos = UnsafeMutablePointer<Int32>.allocate(capacity: maxRegions)

    private enum Waiter {
        case none
        case notify(IONotify, AnyObject?)
        case sync
    }
    private var waiter = Waiter.none
    private let syncLock = ConditionLock()
    private var syncResult: IOResult?
    /// Held while the request is in flight, not while the job waits in it.
    private var pool: ObjectPool<IOJob>?

    init() {}

    deinit { errnos.deallocate() }

    func start(pool: ObjectPool<IOJob>, notify: IONotify?, context: AnyObject?) {
        self.pool = pool
        waiter = notify.map { .notify($0, context) } ?? .sync
        syncResult = nil
        errorBits.store(0, ordering: .relaxed)
        // The dispatcher holds one count until every bio is issued, so that
        // an early completion cannot end the request (the kernel does the same).
        pending.store(1, ordering: .relaxed)
    }

    /// Adds `count` bios about to be issued.
    func expect(_ count: Int) {
        pending.add(count, ordering: .relaxed)
    }

    /// One bio of region `region` ended with `errno` (0 on success).
    func endIO(region: Int, errno: Int32) {
        if errno != 0 {
            let bit = UInt64(1) << UInt64(region)
            let (before, _) = errorBits.bitwiseOr(bit, ordering: .relaxed)
            if before & bit == 0 { errnos[region] = errno }
        }
        if pending.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 {
            complete()
        }
    }

    private func complete() {
        let bits = ErrorBits(rawValue: errorBits.load(ordering: .relaxed))
        let result = bits.isEmpty
            ? IOResult.success
            : IOResult(errorBits: bits, failures: bits.regions.map { RegionFailure(region: $0, errno: errnos[$0]) })
        switch waiter {
        case .notify(let notify, let context):
            waiter = .none
            recycle()
            notify(result, context)
        case .sync:
            syncLock.withLock { syncResult = result }
            syncLock.signal()
        case .none:
            preconditionFailure("dm-io request completed twice")
        }
    }

    private func recycle() {
        let pool = self.pool!
        self.pool = nil
        pool.recycle(self)
    }

    /// Whether a synchronous request has its result.
    var isSyncDone: Bool { syncLock.withLock { syncResult != nil } }

    /// Waits for a synchronous request, then returns the job to its pool.
    func waitForSync() -> IOResult {
        syncLock.lock()
        while syncResult == nil { syncLock.wait() }
        let result = syncResult!
        syncLock.unlock()
        waiter = .none
        recycle()
        return result
    }
}

/// The most regions one write may name: one bit each in `ErrorBits`.
public let maxRegions = 64
