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

extension IOURing {
    /// Places `bio` in a submission slot, handing the queued entries to the
    /// kernel first if every slot is taken.
    func place(_ bio: Bio) {
        if freeSubmissionSlots == 0 { submit() }
        let placed = prepare(bio.uringOperation, userData: bio.retainedRingToken)
        precondition(placed, "io_uring: no submission slot after submit")
    }
}
