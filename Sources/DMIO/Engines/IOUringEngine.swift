import Glibc
import URing

/// io_uring through liburing. A batch of bios (all the bios of one request,
/// e.g. every leg of a mirrored write) is one `io_uring_enter`; one thread
/// reaps completions in batches and ends the bios.
///
/// Submission never blocks: bios beyond what the ring may have in flight
/// wait in a backlog that the reaper feeds into the ring as slots free up,
/// so a completion callback that submits more I/O cannot deadlock. I/O
/// submitted from completion callbacks (a queue kept full, a mirror's next
/// write) is only queued; the reaper enters the kernel once for the whole
/// batch of completions. So is I/O from a plugged thread, until it unplugs.
final class IOUringEngine: IOEngine, @unchecked Sendable {
    let kind = IOEngineKind.ioUring
    private let ring: IOURing
    /// At most this many bios in the ring at once; the completion queue
    /// (twice the submission queue) then never overflows.
    private let lock = ConditionLock()
    private var slots: RingSlots
    /// Entries prepared in the ring but not yet handed to the kernel.
    private var unsubmitted = false
    private var stopping = false
    private var reaper = pthread_t()
    /// Whether the calling thread is the reaper, running completions.
    private var onReaper: Bool { pthread_equal(pthread_self(), reaper) != 0 }
    /// Block-device ioctls (BLKDISCARD, BLKZEROOUT) have no io_uring opcode.
    private let ioctlWorker: ThreadPoolEngine

    /// user_data of the no-op that wakes the reaper to stop.
    private static let stopToken: UInt64 = 0

    init(entries: UInt32 = 256) throws(URingError) {
        ring = try IOURing(entries: entries)
        slots = RingSlots(capacity: Int(entries))
        ioctlWorker = ThreadPoolEngine(threads: 1)
        reaper = startThread(named: "dmio-uring") { [self] in reap() }
    }

    func submit(_ batch: BioBatch) {
        var batch = batch
        let ioctls = batch.removeBlockDeviceIoctls()
        let plugged = Plug.isPlugged
        lock.withLock {
            slots.queue(batch)
            feedRingLocked(enterKernel: !onReaper && !plugged)
        }
        if plugged && !onReaper { Plug.held(by: self) }
        if !ioctls.isEmpty { ioctlWorker.submit(ioctls) }
    }

    func flushPlugged() {
        lock.withLock { feedRingLocked() }
    }

    func shutdown() {
        lock.withLock {
            stopping = true
            // Wakes the reaper; it stops once every bio has completed.
            while !ring.prepare(.nop, userData: Self.stopToken) { ring.submit() }
            ring.submit()
        }
        pthread_join(reaper, nil)
        ioctlWorker.shutdown()
    }

    /// Moves backlog bios into free ring slots, and hands every prepared
    /// entry to the kernel unless `enterKernel` is false (the reaper does
    /// that after its batch).
    private func feedRingLocked(enterKernel: Bool = true) {
        if slots.feed(ring) { unsubmitted = true }
        if enterKernel && unsubmitted {
            unsubmitted = false
            ring.submit()
        }
    }

    private func reap() {
        var again = BioBatch()
        var stopSeen = false
        while true {
            let reaped = ring.waitCompletions { userData, result in
                if userData == Self.stopToken {
                    stopSeen = true
                    return
                }
                // A finished bio reports to its request right here, on
                // this thread; a short transfer or a fallback goes again.
                if let bio = Bio.ringCompletion(token: userData, result: result) { again.append(bio) }
            }
            if reaped < 0 { continue }  // EINTR
            let done = lock.withLock {
                slots.completed(reaped - (stopSeen ? 1 : 0))
                stopSeen = false
                slots.queue(again)
                again = BioBatch()
                feedRingLocked()
                return stopping && slots.isIdle
            }
            if done { return }
        }
    }
}
