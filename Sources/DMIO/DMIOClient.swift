/// A dm-io client (`struct dm_io_client`): the page pool, the pools of
/// in-flight requests and bios, and the I/O engine that serves them.
///
/// Every request names its regions, an operation, and for reads and writes
/// the memory. Reads take exactly one region; writes, discards, zeroing and
/// flushes take 1 to 64, one bit each in the result's `ErrorBits`. A
/// request that breaks a rule throws `DMIOError` and issues no I/O; a
/// request that ran reports each region's failure in its `IOResult`.
///
/// Each kind of memory has a sync form, an async form with a completion
/// (`IONotify`, called exactly once) and a Swift `async` form.
///
/// A completion runs on an engine thread, or, as in the kernel, on the
/// submitting thread inside `submit` when every bio ended before `submit`
/// returned. So a completion may be called before `submit` returns: do not
/// hold a lock across `submit` that the completion takes. Do not call a
/// sync form from inside a completion: the thread it runs on may be the one
/// that would have to wake it.
public final class DMIOClient: @unchecked Sendable {
    /// The engine this client runs on.
    public let engineKind: IOEngineKind
    /// The pages `get(pages:)` and `put(pages:)` size.
    public let pool = PagePool()

    private let engine: IOEngine
    private let pools = RequestPools()
    /// `pools.jobs`, taken from for each request without counting: `pools` keeps it.
    private let jobPool: Unmanaged<ObjectPool<IOJob>>

    /// Creates a client on `engine`, with `pages` pages ready in its pool.
    /// `threads` sizes the thread-pool engine.
    public convenience init(engine choice: IOEngineChoice = .automatic, pages: Int = 0,
                            threads: Int = 8) throws(DMIOError) {
        self.init(engine: try makeEngine(choice, threads: threads), pages: pages)
    }

    private init(engine: IOEngine, pages: Int) {
        self.engine = engine
        engineKind = engine.kind
        jobPool = Unmanaged.passUnretained(pools.jobs)
        // Bios and jobs are created on demand and kept; a few hundred up
        // front cover a queue depth of 32 to many legs without allocating.
        pools.jobs.prefill(128)
        pools.bios.prefill(256)
        pool.get(pages: pages)
    }

    deinit { engine.shutdown() }

    // MARK: A client driven by its own thread (an event loop)

    /// Makes a client whose io_uring the calling thread drives: only this
    /// thread may use it; it submits, and reaps completions as it enters the
    /// kernel or when `completionEventFD` becomes readable (then call
    /// `reapCompletions()`). No DMIO thread is involved, so an event loop
    /// pays no thread switch per request. Synchronous requests drive the
    /// ring themselves.
    public static func threadDriven(pages: Int = 0) throws(DMIOError) -> DMIOClient {
        let engine: ThreadDrivenEngine
        do { engine = try ThreadDrivenEngine() } catch {
            throw .engineUnavailable(engine: .ioUring, errno: error.errno)
        }
        return DMIOClient(engine: engine, pages: pages)
    }

    /// Whether writes of 256 KiB or more to files in memory go to the engine
    /// (its kernel workers, on another core) rather than being copied by the
    /// submitting thread. Worth it while a core is idle: the submitter, an
    /// event loop, goes on reading requests meanwhile. A loss when every
    /// core has a submitter of its own: the workers then only add thread
    /// switches, and contend with the submitters for the same files. Set it
    /// on the thread that submits.
    public var offloadsLargeMemoryWrites = false

    /// For a thread-driven client: readable when completions wait.
    public var completionEventFD: Int32? { (engine as? ThreadDrivenEngine)?.eventFD }

    /// For a thread-driven client: ends every request whose I/O completed.
    public func reapCompletions() {
        (engine as? ThreadDrivenEngine)?.reap()
    }

    // MARK: The page pool (dm_io_get / dm_io_put)

    /// `dm_io_get`: grows the page pool by `pages` that will be in use at once.
    public func get(pages: Int) { pool.get(pages: pages) }

    /// `dm_io_put`: gives back what a matching `get(pages:)` asked for.
    public func put(pages: Int) { pool.put(pages: pages) }

    /// Takes `count` pages from the pool as a page list, waiting while the
    /// pool has fewer free (see `PagePool`).
    public func allocatePages(_ count: Int) -> PageList { pool.take(count) }

    /// Returns pages taken with `allocatePages(_:)`.
    public func release(_ pages: PageList) { pool.give(pages) }

    // MARK: Synchronous requests (dm_io_sync, dm_io_sync_bvec, dm_io_sync_vm)

    /// Runs a request and waits for it. `memory` is needed by reads and
    /// writes and ignored by the other operations.
    public func sync(_ operation: IOOperation, regions: [IORegion], memory: IOMemory? = nil,
                     flags: IOFlags = []) throws(DMIOError) -> IOResult {
        try regions.withUnsafeBufferPointer { regions throws(DMIOError) in
            try validate(operation, regions: regions, memory: memory)
            return jobPool._withUnsafeGuaranteedRef { $0.take() }._withUnsafeGuaranteedRef { job in
                job.start(pools: pools, regions: regions, notify: nil, context: nil)
                dispatch(operation, regions: regions, memory: memory, flags: flags, job: job)
                (engine as? ThreadDrivenEngine)?.run { job.isSyncDone }
                return job.waitForSync()
            }
        }
    }

    /// `dm_io_sync`: a page list, starting `offset` bytes into its first page.
    public func sync(_ operation: IOOperation, regions: [IORegion], pages: PageList, offset: Int,
                     flags: IOFlags = []) throws(DMIOError) -> IOResult {
        try sync(operation, regions: regions, memory: .pageList(pages, offset: offset), flags: flags)
    }

    /// `dm_io_sync_bvec`: an array of bio vectors.
    public func sync(_ operation: IOOperation, regions: [IORegion], bioVectors: [BioVec],
                     flags: IOFlags = []) throws(DMIOError) -> IOResult {
        try sync(operation, regions: regions, memory: .bioVectors(bioVectors), flags: flags)
    }

    /// `dm_io_sync_vm`: one contiguous buffer.
    public func sync(_ operation: IOOperation, regions: [IORegion], buffer: UnsafeMutableRawBufferPointer,
                     flags: IOFlags = []) throws(DMIOError) -> IOResult {
        try sync(operation, regions: regions, memory: .buffer(buffer), flags: flags)
    }

    // MARK: Asynchronous requests (dm_io_async, dm_io_async_bvec, dm_io_async_vm)

    /// Starts a request; `notify` is called once with its result and
    /// `context`. The memory must stay valid until then.
    public func submit(_ operation: IOOperation, regions: [IORegion], memory: IOMemory? = nil,
                       flags: IOFlags = [], context: AnyObject? = nil,
                       notify: @escaping IONotify) throws(DMIOError) {
        try regions.withUnsafeBufferPointer { regions throws(DMIOError) in
            try submit(operation, regions: regions, memory: memory, flags: flags, context: context, notify: notify)
        }
    }

    /// The regions as the kernel's `dm_io` takes them, a pointer and a
    /// count, read only until `submit` returns: a caller that makes them
    /// for each request keeps them off the heap (`withUnsafeTemporaryAllocation`).
    public func submit(_ operation: IOOperation, regions: UnsafeBufferPointer<IORegion>, memory: IOMemory? = nil,
                       flags: IOFlags = [], context: AnyObject? = nil,
                       notify: @escaping IONotify) throws(DMIOError) {
        try validate(operation, regions: regions, memory: memory)
        start(operation, regions: regions, memory: memory, flags: flags, context: context, notify: notify)
    }

    /// `dm_io_async`: a page list, starting `offset` bytes into its first page.
    public func submit(_ operation: IOOperation, regions: [IORegion], pages: PageList, offset: Int,
                       flags: IOFlags = [], context: AnyObject? = nil,
                       notify: @escaping IONotify) throws(DMIOError) {
        try submit(operation, regions: regions, memory: .pageList(pages, offset: offset), flags: flags,
                   context: context, notify: notify)
    }

    /// `dm_io_async_bvec`: an array of bio vectors.
    public func submit(_ operation: IOOperation, regions: [IORegion], bioVectors: [BioVec],
                       flags: IOFlags = [], context: AnyObject? = nil,
                       notify: @escaping IONotify) throws(DMIOError) {
        try submit(operation, regions: regions, memory: .bioVectors(bioVectors), flags: flags,
                   context: context, notify: notify)
    }

    /// `dm_io_async_vm`: one contiguous buffer.
    public func submit(_ operation: IOOperation, regions: [IORegion], buffer: UnsafeMutableRawBufferPointer,
                       flags: IOFlags = [], context: AnyObject? = nil,
                       notify: @escaping IONotify) throws(DMIOError) {
        try submit(operation, regions: regions, memory: .buffer(buffer), flags: flags,
                   context: context, notify: notify)
    }

    // MARK: Swift concurrency

    /// Runs a request and suspends until it completes.
    public func perform(_ operation: IOOperation, regions: [IORegion], memory: IOMemory? = nil,
                        flags: IOFlags = []) async throws(DMIOError) -> IOResult {
        try regions.withUnsafeBufferPointer { regions throws(DMIOError) in
            try validate(operation, regions: regions, memory: memory)
        }
        return await withCheckedContinuation { continuation in
            regions.withUnsafeBufferPointer { regions in
                start(operation, regions: regions, memory: memory, flags: flags, context: nil) { result, _ in
                    continuation.resume(returning: result)
                }
            }
        }
    }

    // MARK: Plugging (blk_start_plug / blk_finish_plug)

    /// Until `unplug()`, I/O this thread submits is queued, not yet handed
    /// to the kernel; `unplug()` hands it over in one go. A server plugs for
    /// each batch of requests it reads, so that a batch costs one system
    /// call. Plugs nest; every `plug()` needs its `unplug()` on the same
    /// thread, or the queued I/O waits. Completions are unaffected.
    public func plug() {
        Plug.start()
    }

    public func unplug() {
        Plug.finish()
    }

    // MARK: Issuing I/O

    private func start(_ operation: IOOperation, regions: UnsafeBufferPointer<IORegion>, memory: IOMemory?,
                       flags: IOFlags, context: AnyObject?, notify: @escaping IONotify) {
        jobPool._withUnsafeGuaranteedRef { $0.take() }._withUnsafeGuaranteedRef { job in
            job.start(pools: pools, regions: regions, notify: notify, context: context)
            dispatch(operation, regions: regions, memory: memory, flags: flags, job: job)
        }
    }

    /// The kernel's `dispatch_io` and `do_region`: turns each region of a
    /// validated request into bios and issues them. Every region of a write
    /// walks the same memory from its start. Discard and write-zeroes are
    /// ranges, split so that each fits an NBD command's 32-bit length.
    private func dispatch(_ operation: IOOperation, regions: UnsafeBufferPointer<IORegion>, memory: IOMemory?,
                          flags: IOFlags, job: IOJob) {
        var batch = BioBatch()
        let longest = memory == nil ? Self.maxRangeBytes : UInt64(Bio.maxBytes)
        for index in regions.indices {
            let (start, length) = (regions[index].byteOffset, regions[index].byteCount)
            regions.withDevice(at: index) { device in
                if operation == .flush {
                    var none: PageIterator?
                    _ = issueBio(job, region: index, device: device, operation, flags, offset: 0, length: 0,
                                 memory: &none, batch: &batch)
                    return
                }
                var offset = start
                let end = start + length
                var pages = memory.map(PageIterator.init)
                while offset < end {
                    offset += issueBio(job, region: index, device: device, operation, flags, offset: offset,
                                       length: min(end - offset, longest), memory: &pages, batch: &batch)
                }
            }
        }
        let onSubmitter = batch.remove { [offloadsLargeMemoryWrites] in
            SubmitterIO.shouldRun($0, offloadingLargeWrites: offloadsLargeMemoryWrites)
        }
        if !batch.isEmpty { engine.submit(batch) }
        // Drop the dispatcher's count: the request ends with its last bio.
        job.endIO(region: 0, errno: 0)
        SubmitterIO.run(onSubmitter)
    }

    /// Discards and zeroing split at 1 GiB (NBD commands carry a 32-bit length).
    private static let maxRangeBytes: UInt64 = 1 << 30

    /// Issues one bio of region `index` of `job`: `length` bytes at
    /// `offset`, from `memory`'s next segments when the operation moves
    /// data (as many as one bio carries). Returns the bytes it covers. The
    /// bio is counted in its request before its device may complete it.
    private func issueBio(_ job: IOJob, region index: Int, device: BlockDevice, _ operation: IOOperation,
                          _ flags: IOFlags, offset: UInt64, length: UInt64, memory pages: inout PageIterator?,
                          batch: inout BioBatch) -> UInt64 {
        job.takeBio()._withUnsafeGuaranteedRef { bio in
            bio.start(job: job, region: index, device: device, operation: operation, flags: flags,
                      offset: offset, length: length)
            var covered = length
            if pages != nil {
                var filled = 0
                let wanted = Int(length)
                while filled < wanted, bio.segmentCount < Bio.maxSegments,
                      let segment = pages!.next(maxBytes: wanted - filled) {
                    _ = bio.append(segment)
                    filled += segment.count
                }
                covered = UInt64(filled)
                bio.truncate(to: covered)
                bio.bounceIfMisaligned(alignment: device.memoryAlignment)
            }
            job.expect(1)
            device.issue(bio, batch: &batch)
            return covered
        }
    }
}

/// A client's pools of requests and bios. A request in flight holds them:
/// its bios reference it, their pool and their devices unowned, and the
/// client may be gone before they end.
final class RequestPools: Sendable {
    let jobs = ObjectPool { IOJob() }
    let bios = ObjectPool { Bio() }
}
