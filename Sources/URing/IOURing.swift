// liburing.h pulls in glibc headers; CLibURing's shim imports Glibc's module
// first so the two agree (see Sources/CLibURing/shim.h). Iovec arrays
// cross this module's API as raw pointers to `struct iovec`.
internal import CLibURing
import Glibc

/// One operation to place in a submission queue entry.
public enum URingOperation {
    /// `iovecs` points to `count` contiguous `struct iovec`.
    case readv(fd: Int32, iovecs: UnsafeRawPointer, count: Int, offset: UInt64)
    /// `flags` are per-I/O `RWF_*` flags, e.g. `RWF_DSYNC` for a FUA write.
    case writev(fd: Int32, iovecs: UnsafeRawPointer, count: Int, offset: UInt64, flags: Int32)
    case fsync(fd: Int32, dataOnly: Bool)
    case fallocate(fd: Int32, mode: Int32, offset: UInt64, length: UInt64)
    case nop
}

/// A failed liburing call: which one, and the errno it gave.
public struct URingError: Error {
    public let errno: Int32
    public let call: String
}

/// A single io_uring instance, as liburing sets it up.
///
/// Not thread-safe by itself: the submission side and the completion side
/// may each be used by one thread at a time (they may be different threads;
/// the kernel allows a submitter and a reaper to run concurrently).
public final class IOURing {
    private let ring: UnsafeMutablePointer<io_uring>
    public let entries: UInt32

    /// Sets up a ring with `entries` submission slots (the completion queue
    /// gets twice that). Throws with the kernel's errno, e.g. EPERM or ENOSYS
    /// where a container's seccomp policy forbids io_uring.
    ///
    /// The ring runs completion work cooperatively (COOP_TASKRUN, Linux
    /// 5.19): the kernel no longer interrupts a running submitter for each
    /// completion a kernel worker posts, which cost three quarters of the
    /// 4 KiB throughput (BENCHMARKS.md). Sleeping submitters are still woken.
    /// Older kernels refuse the flag with EINVAL and get a plain ring.
    ///
    /// A `singleIssuer` ring may only be used by the thread that makes it
    /// (SINGLE_ISSUER), and completion work waits until that thread asks for
    /// events (DEFER_TASKRUN, Linux 6.1): no other thread is ever
    /// interrupted or woken for it.
    public init(entries: UInt32, singleIssuer: Bool = false) throws(URingError) {
        ring = .allocate(capacity: 1)
        ring.initialize(to: io_uring())
        let cooperative = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG
        var rc = Int32(-EINVAL)
        if singleIssuer {
            rc = io_uring_queue_init(entries, ring, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN)
        }
        if rc == -EINVAL {
            rc = io_uring_queue_init(entries, ring, cooperative)
        }
        if rc == -EINVAL {
            rc = io_uring_queue_init(entries, ring, 0)
        }
        if rc < 0 {
            ring.deallocate()
            throw URingError(errno: -rc, call: "io_uring_queue_init")
        }
        self.entries = entries
    }

    deinit {
        io_uring_queue_exit(ring)
        ring.deallocate()
    }

    /// Number of free submission slots.
    public var freeSubmissionSlots: Int { Int(io_uring_sq_space_left(ring)) }

    /// Places `operation` in the next submission slot. Returns false when the
    /// submission queue is full (call `submit()` and retry).
    public func prepare(_ operation: URingOperation, userData: UInt64) -> Bool {
        guard let sqe = io_uring_get_sqe(ring) else { return false }
        switch operation {
        case .readv(let fd, let iovecs, let count, let offset):
            io_uring_prep_readv(sqe, fd, iovecs.assumingMemoryBound(to: iovec.self), UInt32(count), offset)
        case .writev(let fd, let iovecs, let count, let offset, let flags):
            io_uring_prep_writev(sqe, fd, iovecs.assumingMemoryBound(to: iovec.self), UInt32(count), offset)
            dmio_sqe_set_rw_flags(sqe, flags)
        case .fsync(let fd, let dataOnly):
            io_uring_prep_fsync(sqe, fd, dataOnly ? UInt32(IORING_FSYNC_DATASYNC) : 0)
        case .fallocate(let fd, let mode, let offset, let length):
            io_uring_prep_fallocate(sqe, fd, mode, off_t(offset), off_t(length))
        case .nop:
            io_uring_prep_nop(sqe)
        }
        io_uring_sqe_set_data64(sqe, userData)
        return true
    }

    /// Hands every prepared entry to the kernel. Returns the number
    /// submitted, or a negative errno.
    @discardableResult
    public func submit() -> Int32 {
        io_uring_submit(ring)
    }

    /// Submits what is prepared and runs the completion work the kernel
    /// deferred to this thread, so that its completions can be reaped.
    @discardableResult
    public func submitAndGetEvents() -> Int32 {
        io_uring_submit_and_get_events(ring)
    }

    /// Makes an eventfd the kernel signals when completions are posted
    /// (or, with DEFER_TASKRUN, when completion work waits for this
    /// thread). The caller owns the descriptor.
    public func registerEventFD() throws(URingError) -> Int32 {
        let fd = dmio_eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        guard fd >= 0 else { throw URingError(errno: errno, call: "eventfd") }
        let rc = io_uring_register_eventfd(ring, fd)
        guard rc == 0 else {
            close(fd)
            throw URingError(errno: -rc, call: "io_uring_register_eventfd")
        }
        return fd
    }

    /// Waits until at least one completion is available, then passes every
    /// available completion to `body` as (userData, result) and consumes
    /// them. `result` is the syscall's return value or a negative errno.
    /// Returns the number of completions, or a negative errno (e.g. -EINTR).
    public func waitCompletions(_ body: (UInt64, Int32) -> Void) -> Int {
        var cqe: UnsafeMutablePointer<io_uring_cqe>? = nil
        let rc = io_uring_wait_cqe(ring, &cqe)
        if rc < 0 { return Int(rc) }
        return reapCompletions(body)
    }

    /// Passes every completion already available to `body` without waiting.
    public func reapCompletions(_ body: (UInt64, Int32) -> Void) -> Int {
        var count = 0
        // liburing's io_uring_for_each_cqe, spelled out: read the ring from
        // head to the kernel's tail, then release the slots in one step.
        var head = ring.pointee.cq.khead.pointee
        let tail = dmio_load_acquire(ring.pointee.cq.ktail)
        let mask = ring.pointee.cq.ring_mask
        while head != tail {
            let cqe = ring.pointee.cq.cqes + Int(head & mask)
            body(cqe.pointee.user_data, cqe.pointee.res)
            head &+= 1
            count += 1
        }
        if count > 0 { io_uring_cq_advance(ring, UInt32(count)) }
        return count
    }
}
