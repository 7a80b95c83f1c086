import DMIO

/// What is going on in each region (dm-region-hash): the writes in flight,
/// the regions the copier holds and the writes waiting for them, and which
/// regions were written lately. A write to a region under copy waits for
/// the copy, and a copy waits for the writes in flight to drain, so that a
/// copy never puts old bytes over a newer write.
///
/// It starts no I/O. A write counted here has its bits marked in the
/// `bitmap` in the same step (under this hash's lock, then the bitmap's),
/// so that the cleaner, which clears bits under this lock too, can never
/// clear the bit of a region with a write in flight.
final class RegionHash: @unchecked Sendable {
    /// How a write's start went (`startWrite`).
    enum WriteStart {
        /// Counted, its bits durable: issue it.
        case ready
        /// Counted, its bits set but not yet on the legs: commit the bitmap,
        /// then issue it.
        case needsCommit
        /// A copy holds one of its regions: nothing counted; the write's
        /// `whenReleased` comes back from `endCopy` once the copy lets go.
        case held
    }

    let regionBytes: UInt64
    private let bitmap: RegionBitmap
    private let lock = ConditionLock()
    private var inFlight: [Int: Int] = [:]
    /// Regions a write started in, since the cleaner's last two ticks.
    private var recentlyWritten: RegionBits
    private var previouslyWritten: RegionBits
    /// Regions the copier holds, and the writes waiting for them.
    private var copying: Set<Int> = []
    private var heldWrites: [(regions: ClosedRange<Int>, resume: @Sendable () -> Void)] = []

    init(regionBytes: UInt32, bitmap: RegionBitmap) {
        self.regionBytes = UInt64(regionBytes)
        self.bitmap = bitmap
        recentlyWritten = RegionBits(count: bitmap.regionCount)
        previouslyWritten = RegionBits(count: bitmap.regionCount)
    }

    /// The regions that bytes `offset..<offset+length` of the mirror touch.
    func regions(offset: UInt64, length: UInt64) -> ClosedRange<Int> {
        let first = Int(offset / regionBytes)
        let last = Int((offset + max(length, 1) - 1) / regionBytes)
        return first...last
    }

    private func isHeld(_ regions: ClosedRange<Int>) -> Bool {
        !copying.isEmpty && regions.contains(where: copying.contains)
    }

    /// Counts a write starting in `regions`; lock held.
    private func countStart(_ regions: ClosedRange<Int>) {
        for region in regions {
            inFlight[region, default: 0] += 1
            recentlyWritten[region] = true
        }
    }

    // MARK: Writes (dm_rh_inc_pending, dm_rh_dec)

    /// Counts a write in `regions` if no copy holds them and their bits are
    /// durable; returns false, having counted nothing, otherwise (then
    /// `startWrite`). Most writes take this path and need no continuation.
    func tryStartWrite(_ regions: ClosedRange<Int>) -> Bool {
        lock.withLock {
            guard !isHeld(regions), bitmap.isDurablyDirty(regions) else { return false }
            countStart(regions)
            return true
        }
    }

    /// Counts a write in `regions` and marks their bits, unless a copy
    /// holds one of them: then `whenReleased` waits for the copy. Every
    /// write counted needs its `endWrite`.
    func startWrite(_ regions: ClosedRange<Int>, whenReleased: @escaping @Sendable () -> Void) -> WriteStart {
        lock.withLock {
            if isHeld(regions) {
                heldWrites.append((regions, whenReleased))
                return .held
            }
            countStart(regions)
            return bitmap.mark(regions) ? .ready : .needsCommit
        }
    }

    func endWrite(_ regions: ClosedRange<Int>) {
        lock.withLock {
            var drained = false
            // Found once: every write ends here, and each lookup is a hash.
            for region in regions {
                guard let index = inFlight.index(forKey: region) else {
                    assertionFailure("a write ended in region \(region), where none had started")
                    continue
                }
                if inFlight.values[index] == 1 {
                    inFlight.remove(at: index)
                    drained = drained || copying.contains(region)
                } else {
                    inFlight.values[index] -= 1
                }
            }
            if drained { lock.broadcast() }
        }
    }

    // MARK: Copies (dm_rh_recovery_start, dm_rh_recovery_end)

    /// Holds `regions` for a copy: later writes to them wait, and this
    /// blocks until the writes in flight there have ended.
    func startCopy(_ regions: Range<Int>) {
        lock.withLock {
            copying.formUnion(regions)
            while regions.contains(where: { inFlight[$0] != nil }) { lock.wait() }
        }
    }

    /// Lets go of `regions`; returns the writes that waited for them and
    /// wait for nothing else now, for the caller to start again.
    func endCopy(_ regions: Range<Int>) -> [@Sendable () -> Void] {
        lock.withLock {
            copying.subtract(regions)
            var released: [@Sendable () -> Void] = []
            heldWrites.removeAll { held in
                guard !isHeld(held.regions) else { return false }
                released.append(held.resume)
                return true
            }
            return released
        }
    }

    // MARK: Lazy clearing

    /// Whether nothing goes on in `region` and nothing went on in the last
    /// two ticks; lock held.
    private func isIdle(_ region: Int) -> Bool {
        inFlight[region] == nil && !copying.contains(region)
            && !recentlyWritten[region] && !previouslyWritten[region]
    }

    /// Dirty regions that may be cleared once the legs are flushed: idle,
    /// none written in the last two ticks. Each call is a tick.
    func idleDirtyRegions() -> [Int] {
        lock.withLock {
            let candidates = bitmap.dirtyRegions.filter(isIdle)
            swap(&previouslyWritten, &recentlyWritten)
            recentlyWritten.clearAll()
            return candidates
        }
    }

    /// Clears the bits of `candidates` that no write has touched since they
    /// were chosen (the legs have been flushed since). Returns how many.
    func clearIdle(_ candidates: [Int]) -> Int {
        lock.withLock {
            bitmap.clear(candidates) { region in
                inFlight[region] == nil && !copying.contains(region) && !recentlyWritten[region]
            }
        }
    }

    /// Clears every bit with no write in flight: a clean stop with every
    /// leg in sync. Returns how many.
    func clearAllIdle() -> Int {
        lock.withLock {
            bitmap.clear(0..<bitmap.regionCount) { inFlight[$0] == nil }
        }
    }
}
