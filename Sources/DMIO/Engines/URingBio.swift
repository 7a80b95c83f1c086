import URing

/// How a bio becomes an io_uring operation, and how a ring holds it: both
/// io_uring engines share these.
extension Bio {
    var uringOperation: URingOperation {
        switch command {
        case .read:
            let (iovecs, count) = self.iovecs
            return .readv(fd: fd, iovecs: iovecs, count: count, offset: offset)
        case .write, .zeroWrite:
            let (iovecs, count) = self.iovecs
            return .writev(fd: fd, iovecs: iovecs, count: count, offset: offset,
                           flags: flags.contains(.fua) ? Linux.writeDataSync : 0)
        case .allocate(let mode):
            return .fallocate(fd: fd, mode: mode, offset: offset, length: remaining)
        case .sync:
            return .fsync(fd: fd, dataOnly: true)
        case .blockDeviceRange:
            preconditionFailure("io_uring has no block-device ioctls; they go to a worker thread")
        }
    }

    /// The ring's user_data for this bio: a retained reference, released by
    /// `ringCompletion` when the completion is reaped.
    var retainedRingToken: UInt64 {
        UInt64(UInt(bitPattern: Unmanaged.passRetained(self).toOpaque()))
    }

    /// Ends the submission that `token` stands for with the ring's
    /// `result`; returns the bio when it must be submitted again.
    static func ringCompletion(token: UInt64, result: Int32) -> Bio? {
        let bio = Unmanaged<Bio>.fromOpaque(UnsafeRawPointer(bitPattern: UInt(token))!).takeRetainedValue()
        return bio.absorb(result: Int(result)) ? nil : bio
    }
}

extension BioBatch {
    /// Takes the block-device ioctls out of the batch: io_uring has no
    /// opcode for them, so they go to a worker thread.
    mutating func removeBlockDeviceIoctls() -> BioBatch {
        remove { bio in
            if case .blockDeviceRange = bio.command { return true }
            return false
        }
    }
}

/// The bios an engine has for its ring: at most `capacity` in the ring (its
/// completion queue must never overflow), the rest in a backlog, in order,
/// until a slot frees.
struct RingSlots {
    let capacity: Int
    private(set) var inFlight = 0
    private var backlog = BioBatch()

    init(capacity: Int) {
        self.capacity = capacity
    }

    var isIdle: Bool { inFlight == 0 && backlog.isEmpty }

    mutating func queue(_ batch: BioBatch) { backlog.append(contentsOf: batch) }
    mutating func queue(_ bio: Bio) { backlog.append(bio) }

    /// Moves backlog bios into free slots of `ring`; returns whether it
    /// placed any (they wait in the ring until its next submit).
    @discardableResult
    mutating func feed(_ ring: IOURing) -> Bool {
        var placed = false
        while inFlight < capacity, let bio = backlog.popFirst() {
            ring.place(bio)
            inFlight += 1
            placed = true
        }
        return placed
    }

    /// `count` bios left the ring.
    mutating func completed(_ count: Int) { inFlight -= count }
}

extension IOURing {
    /// Places `bio` in a submission slot, handing the queued entries to the
    /// kernel first if every slot is taken.
    func place(_ bio: Bio) {
        if freeSubmissionSlots == 0 { submit() }
        let placed = prepare(bio.uringOperation, userData: bio.retainedRingToken)
        precondition(placed, "io_uring: no submission slot after submit")
    }
}
