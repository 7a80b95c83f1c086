import Glibc
import URing

/// io_uring driven by the one thread that made it, with no thread of its
/// own: that thread submits, and reaps completions when it enters the
/// kernel or when the ring's eventfd says completions wait. Made for event
/// loops: reads that complete during submission are reaped right after it,
/// and nothing else ever wakes a thread for them.
///
/// The ring is SINGLE_ISSUER and DEFER_TASKRUN where the kernel allows it
/// (6.1): completion work from io-wq (buffered writes on tmpfs) waits for
/// the owner, which the eventfd wakes once.
final class ThreadDrivenEngine: IOEngine, @unchecked Sendable {
    let kind = IOEngineKind.ioUring
    private let ring: IOURing
    private let owner = pthread_self()
    private var slots: RingSlots
    private var reaping = false
    /// Block-device ioctls have no io_uring opcode.
    private let ioctlWorker = ThreadPoolEngine(threads: 1)
    /// Readable when completions wait: the owner then calls `reap()`.
    let eventFD: Int32

    init(entries: UInt32 = 256) throws(URingError) {
        ring = try IOURing(entries: entries, singleIssuer: true)
        eventFD = try ring.registerEventFD()
        slots = RingSlots(capacity: Int(entries))
    }

    private func checkOwner() {
        precondition(pthread_equal(pthread_self(), owner) != 0,
                     "a thread-driven DMIO client was used from a thread other than its own")
    }

    func submit(_ batch: BioBatch) {
        checkOwner()
        var batch = batch
        let ioctls = batch.removeBlockDeviceIoctls()
        slots.queue(batch)
        if !ioctls.isEmpty { ioctlWorker.submit(ioctls) }
        // Completions that submit more I/O are picked up by the reap under way.
        if Plug.isPlugged {
            Plug.held(by: self)
        } else if !reaping {
            reap()
        }
    }

    func flushPlugged() { reap() }

    /// Submits what is queued, runs the completion work waiting for this
    /// thread, and ends every bio that completed.
    func reap() {
        checkOwner()
        guard !reaping else { return }
        reaping = true
        defer { reaping = false }
        slots.feed(ring)
        ring.submitAndGetEvents()
        var again = BioBatch()
        let reaped = ring.reapCompletions { userData, result in
            if let bio = Bio.ringCompletion(token: userData, result: result) { again.append(bio) }
        }
        slots.completed(reaped)
        slots.queue(again)
        // What the completions submitted goes to the kernel now; its own
        // completions arrive through the eventfd, so a completion that always
        // submits more cannot keep this thread from its other work.
        slots.feed(ring)
        ring.submit()
    }

    /// Drives the ring until `done()`, waiting in the kernel while bios are
    /// in it: what a synchronous request does on this thread. Returns early
    /// when the ring is empty (what is left runs on another thread: a remote
    /// device's, or the ioctl worker).
    func run(until done: () -> Bool) {
        while true {
            reap()
            if done() || slots.inFlight == 0 { return }
            // Completions that submit more I/O must not start a second reap
            // while this one still holds the ring's head.
            reaping = true
            defer { reaping = false }
            _ = ring.waitCompletions { userData, result in
                slots.completed(1)
                if let bio = Bio.ringCompletion(token: userData, result: result) { slots.queue(bio) }
            }
            if done() { return }
        }
    }

    func shutdown() {
        ioctlWorker.shutdown()
        close(eventFD)
    }
}
