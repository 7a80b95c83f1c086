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
        /// Without a context: one reference, not two, to count.
        case notify(IONotify)
        case notifyWithContext(IONotify, AnyObject)
        case sync
    }
    private var waiter = Waiter.none
    private let syncLock = ConditionLock()
    private var syncResult: IOResult?
    /// Held while the request is in flight, not while the job waits in its
    /// pool: its bios reference the job, their pool and their devices
    /// unowned, and a client may go while its requests are in flight.
    private var pools: RequestPools?
    /// The regions' devices, one reference each: not the caller's array,
    /// which would then have to live on the heap.
    private let devices = UnsafeMutablePointer<Unmanaged<BlockDevice>>.allocate(capacity: maxRegions)
    private var deviceCount = 0
    /// `pools.bios`, for each bio without counting: `pools` keeps it.
    private var bioPool: Unmanaged<ObjectPool<Bio>>?

    init() {}

    deinit {
        errnos.deallocate()
        devices.deallocate()
    }

    /// Takes a bio for the request from its client's pool.
    func takeBio() -> Unmanaged<Bio> { bioPool.unsafelyUnwrapped._withUnsafeGuaranteedRef { $0.take() } }

    /// Returns a bio of the request, ended, to its pool.
    func recycle(_ bio: Bio) { bioPool.unsafelyUnwrapped._withUnsafeGuaranteedRef { $0.recycle(bio) } }

    func start(pools: RequestPools, regions: UnsafeBufferPointer<IORegion>, notify: IONotify?, context: AnyObject?) {
        self.pools = pools
        precondition(regions.count <= maxRegions, "a request of \(regions.count) regions")
        for index in regions.indices { devices[index] = regions.withDevice(at: index) { Unmanaged.passRetained($0) } }
        deviceCount = regions.count
        bioPool = Unmanaged.passUnretained(pools.bios)
        if let notify {
            if let context { waiter = .notifyWithContext(notify, context) } else { waiter = .notify(notify) }
        } else {
            waiter = .sync
        }
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
        // The job may be taken again once recycled: only locals from there.
        // And once the pools go, with the client gone before, so do this job
        // and the bio that ended it, whose calls are still on this stack:
        // nothing may touch either after the notify returns.
        // Moved out, not copied; a job completed twice then finds `.none`.
        var ending = Waiter.none
        swap(&ending, &waiter)
        switch consume ending {
        case .notify(let notify):
            let pools = recycle()
            withExtendedLifetime(pools) { notify(result, nil) }
        case .notifyWithContext(let notify, let context):
            let pools = recycle()
            withExtendedLifetime(pools) { notify(result, context) }
        case .sync:
            // Signalled under the lock: once it is released, the waiter may
            // recycle the job and its client free it.
            syncLock.withLock {
                syncResult = result
                syncLock.signal()
            }
        case .none:
            preconditionFailure("dm-io request completed twice")
        }
    }

    /// Returns the job to its pool; returns the pools, which the caller
    /// keeps until it is done (they keep the job's memory).
    @discardableResult
    private func recycle() -> RequestPools {
        let pools = self.pools.take()!
        for index in 0..<deviceCount { devices[index].release() }
        deviceCount = 0
        bioPool = nil
        pools.jobs.recycle(self)
        return pools
    }

    /// Whether a synchronous request has its result.
    var isSyncDone: Bool { syncLock.withLock { syncResult != nil } }

    /// Waits for a synchronous request, then returns the job to its pool.
    func waitForSync() -> IOResult {
        syncLock.lock()
        while syncResult == nil { syncLock.wait() }
        let result = syncResult!
        syncLock.unlock()
        recycle()
        return result
    }
}

/// The most regions one write may name: one bit each in `ErrorBits`.
public let maxRegions = 64
