import Glibc

/// Bios that the submitting thread carries out itself with blocking system
/// calls, whatever the engine: writes, zeroing, discards and syncs of files
/// in memory (tmpfs), and their small reads. They are a copy to or from the
/// page cache and never wait for storage, but io_uring cannot start a
/// buffered write to them without blocking (the kernel refuses RWF_NOWAIT
/// there), so in a ring every write would go to an io-wq worker thread and
/// come back: two thread switches for a memcpy.
///
/// Large writes may go to the engine instead (`offloadingLargeWrites`):
/// there a kernel worker copies them on another core while the submitter
/// goes on with its own work, which pays when a core would be idle.
///
/// They run after the dispatcher has dropped its count, so the request's
/// notify runs on the submitting thread before `submit` returns (which
/// DMIO's async form allows). Bios that a notify submits are run by the
/// outermost call, in a loop, so that a chain of requests, each submitted
/// by the previous one's notify, cannot grow the stack.
enum SubmitterIO {
    /// Larger reads go to the ring: io_uring copies them on a worker thread
    /// while the submitter (an event loop) goes on sending earlier replies.
    static let maxReadBytes: UInt64 = 64 << 10
    /// Offloaded writes are at least this long: below it the hand-over to a
    /// worker and back costs more than the copy.
    static let minOffloadedWriteBytes: UInt64 = 256 << 10

    static func shouldRun(_ bio: Bio, offloadingLargeWrites: Bool) -> Bool {
        guard bio.isInMemory else { return false }
        switch bio.command {
        case .read: return bio.remaining <= maxReadBytes
        case .write: return !offloadingLargeWrites || bio.remaining < minOffloadedWriteBytes
        case .zeroWrite, .allocate, .sync: return true
        case .blockDeviceRange: return false
        }
    }

    static func run(_ batch: BioBatch) {
        guard !batch.isEmpty else { return }
        Queue.withCurrent { queue in
            queue.bios.append(contentsOf: batch)
            guard !queue.running else { return }
            queue.running = true
            defer { queue.running = false }
            while let link = queue.bios.popFirstLink() {
                link._withUnsafeGuaranteedRef { bio in
                    // A short transfer or a fallback goes round again.
                    while !bio.absorb(result: performBlocking(bio)) {}
                }
            }
        }
    }

    /// The bios a thread has yet to run, kept per thread.
    private final class Queue {
        var bios = BioBatch()
        var running = false

        private static let queues = ThreadLocal { Queue() }
        static func withCurrent(_ body: (Queue) -> Void) { queues.withValue(body) }
    }
}
