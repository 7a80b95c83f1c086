import Glibc
import Synchronization

/// One unit of I/O to one device, as the kernel's `struct bio`: part of one
/// region of one request. A region whose memory has many segments, or that
/// is long, becomes several bios.
///
/// Bios are pooled by the client and carry their iovec array with them, so
/// that issuing I/O in steady state does not allocate.
final class Bio: @unchecked Sendable {
    /// The most memory segments one bio carries (the kernel's BIO_MAX_VECS is 256).
    static let maxSegments = 64
    /// The most bytes one bio carries; longer regions are split, which also
    /// keeps every NBD command of a remote device well under its size limit.
    static let maxBytes = 4 << 20

    /// What the bio asks its device for, after fallbacks.
    /// The system call a local driver chose (`LocalDevice`); the engines
    /// carry it out on `fd`.
    enum Command {
        case read
        case write
        case allocate(mode: Int32)
        case zeroWrite
        case sync
        case blockDeviceRange(request: UInt)
    }

    /// The request and the device, unmanaged: the request is in flight
    /// while its bios are, and holds their pool and devices (`IOJob.start`).
    private var job: Unmanaged<IOJob>?
    private(set) var region = 0
    private var device: Unmanaged<BlockDevice>?
    /// Of the device, copied: read for every bio.
    private(set) var isInMemory = false
    private var recorder: RequestStatistics.Recorder?
    /// The local device's file descriptor, for the engines; -1 for remote devices.
    private(set) var fd: Int32 = -1
    private(set) var operation = IOOperation.read
    private(set) var flags = IOFlags()
    private(set) var command = Command.read

    /// Where the next transfer starts on the device, and how much is left.
    private(set) var offset: UInt64 = 0
    private(set) var remaining: UInt64 = 0
    /// The bytes the bio asked for, and when it started, for the device's statistics.
    private var length: UInt64 = 0
    private var startedAt: UInt64 = 0

    /// The memory segments, and one slot more for the bounce buffer's iovec.
    let iovecStorage = UnsafeMutablePointer<iovec>.allocate(capacity: maxSegments + 1)
    private var bounceIovec: UnsafeMutablePointer<iovec> { iovecStorage + Bio.maxSegments }
    private var firstIovec = 0
    private var iovecEnd = 0

    /// An aligned copy of the data for devices that need aligned memory
    /// (O_DIRECT) when the caller's memory is not.
    private var bounce: UnsafeMutableRawPointer?

    /// Remote devices issue a bio as several NBD commands.
    let openParts = Atomic<Int>(0)
    let firstPartError = Atomic<Int32>(0)
    /// A FUA write to a device that has no FUA flag is followed by a flush.
    var needsFlushAfterWrite = false
    /// The connection of a remote device that carries the bio's commands;
    /// their completions end there. Unowned: the device keeps it.
    unowned(unsafe) var remoteConnection: RemoteConnection?

    /// Links bios into batches and queues (`BioBatch`).
    var next: Unmanaged<Bio>?

    init() {}

    deinit { iovecStorage.deallocate() }

    func start(job: IOJob, region: Int, device: BlockDevice, operation: IOOperation,
               flags: IOFlags, offset: UInt64, length: UInt64) {
        self.job = Unmanaged.passUnretained(job)
        self.region = region
        self.device = Unmanaged.passUnretained(device)
        isInMemory = device.isInMemory
        recorder = device.recorder
        fd = -1
        command = .read
        self.operation = operation
        self.flags = flags
        self.offset = offset
        self.remaining = length
        self.length = length
        if let recorder { startedAt = recorder.start(operation.rawValue) }
        firstIovec = 0
        iovecEnd = 0
        next = nil
        needsFlushAfterWrite = false
        firstPartError.store(0, ordering: .relaxed)
    }

    /// A local driver's choice: `command` on file descriptor `fd`.
    func useSystemCall(_ command: Command, on fd: Int32) {
        self.command = command
        self.fd = fd
    }

    /// Adds a memory segment; returns false when the bio is full.
    func append(_ segment: UnsafeMutableRawBufferPointer) -> Bool {
        guard iovecEnd < Bio.maxSegments else { return false }
        iovecStorage[iovecEnd] = iovec(iov_base: segment.baseAddress, iov_len: segment.count)
        iovecEnd += 1
        return true
    }

    var segmentCount: Int { iovecEnd - firstIovec }

    /// Shortens the bio to the bytes its segments hold.
    func truncate(to length: UInt64) {
        remaining = length
        self.length = length
    }

    /// The iovecs of the next transfer, and how many.
    var iovecs: (pointer: UnsafeMutablePointer<iovec>, count: Int) {
        if bounce != nil { return (bounceIovec, 1) }
        if case .zeroWrite = command { return zeroIovecs() }
        return (iovecStorage + firstIovec, iovecEnd - firstIovec)
    }

    /// Switches to an aligned bounce buffer when a segment is not aligned to
    /// `alignment` (address or length). Writes copy the data in now; reads
    /// copy it out when they complete.
    func bounceIfMisaligned(alignment: Int) {
        guard alignment > 1, bounce == nil else { return }
        let mask = alignment - 1
        var aligned = true
        for index in firstIovec..<iovecEnd {
            let segment = iovecStorage[index]
            if Int(bitPattern: segment.iov_base) & mask != 0 || segment.iov_len & mask != 0 {
                aligned = false
                break
            }
        }
        if aligned { return }
        let length = Int(remaining)
        let memory = allocateAligned(length, alignment: alignment).baseAddress
        bounce = memory
        bounceIovec.pointee = iovec(iov_base: memory, iov_len: length)
        if operation == .write {
            var copied = 0
            for index in firstIovec..<iovecEnd {
                let segment = iovecStorage[index]
                (memory! + copied).copyMemory(from: segment.iov_base!, byteCount: segment.iov_len)
                copied += segment.iov_len
            }
        }
    }

    /// What the device did with the last submission: bytes transferred, or
    /// a negative errno. Returns true when the bio is finished, false when it
    /// must be submitted again (the rest of a short transfer, or a fallback).
    func absorb(result: Int) -> Bool {
        if result < 0 {
            let error = Int32(-result)
            if error == EINTR || error == EAGAIN { return false }
            if error == EOPNOTSUPP, case .allocate(let mode) = command, operation == .writeZeroes {
                // This file system cannot zero by fallocate: write zeroes instead.
                // Only a local driver chooses fallocate.
                (device!.takeUnretainedValue().driver as? LocalDevice)?.fallocateRefused(mode: mode)
                command = .zeroWrite
                return false
            }
            finish(errno: error)
            return true
        }
        switch command {
        case .read, .write, .zeroWrite:
            if result == 0 && remaining > 0 {
                // No progress: the file ended under us.
                finish(errno: EIO)
                return true
            }
            advance(by: result)
            if remaining > 0 { return false }
            finish(errno: 0)
        case .allocate, .blockDeviceRange:
            // Zeroing and discard have no per-operation FUA: a data sync after
            // them makes them durable before the request completes.
            if flags.contains(.fua) {
                command = .sync
                return false
            }
            finish(errno: 0)
        case .sync:
            finish(errno: 0)
        }
        return true
    }

    private func advance(by count: Int) {
        offset += UInt64(count)
        remaining -= min(UInt64(count), remaining)
        if bounce != nil {
            bounceIovec.pointee.iov_base! += count
            bounceIovec.pointee.iov_len -= count
            return
        }
        // Zero writes rebuild their iovecs from `remaining` on each submission.
        if case .zeroWrite = command { return }
        var left = count
        while left > 0, firstIovec < iovecEnd {
            let length = iovecStorage[firstIovec].iov_len
            if left >= length {
                left -= length
                firstIovec += 1
            } else {
                iovecStorage[firstIovec].iov_base! += left
                iovecStorage[firstIovec].iov_len -= left
                left = 0
            }
        }
    }

    /// Ends the bio: copies a bounced read out, reports to the request, and
    /// returns the bio to its pool.
    func finish(errno: Int32) {
        if let bounce {
            if operation == .read && errno == 0 {
                var copied = 0
                for index in firstIovec..<iovecEnd {
                    let segment = iovecStorage[index]
                    segment.iov_base!.copyMemory(from: bounce + copied, byteCount: segment.iov_len)
                    copied += segment.iov_len
                }
            }
            free(bounce)
            self.bounce = nil
        }
        recorder?.end(operation.rawValue, bytes: length, errno: errno, startedAt: startedAt)
        let job = self.job.unsafelyUnwrapped
        let region = self.region
        self.job = nil
        device = nil
        job._withUnsafeGuaranteedRef { job in
            // The bio may be taken again once recycled, and the request's
            // end may free both (`IOJob.complete`): only locals from here.
            job.recycle(self)
            job.endIO(region: region, errno: errno)
        }
    }

    /// Iovecs that write the next stretch of zeroes from the shared zero page.
    private func zeroIovecs() -> (pointer: UnsafeMutablePointer<iovec>, count: Int) {
        var count = 0
        var left = remaining
        while left > 0 && count < Bio.maxSegments {
            let length = Int(min(left, UInt64(ZeroPage.size)))
            iovecStorage[count] = iovec(iov_base: ZeroPage.bytes, iov_len: length)
            left -= UInt64(length)
            count += 1
        }
        firstIovec = 0
        iovecEnd = count
        return (iovecStorage, count)
    }
}

/// A page-aligned megabyte of zeroes, for writing zeroes where a device
/// cannot zero in place. Never written to.
enum ZeroPage {
    static let size = 1 << 20
    nonisolated(unsafe) static let bytes = allocateAligned(size, zeroed: true).baseAddress!
}
