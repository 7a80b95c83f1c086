import DMIO

/// Which in-sync leg a read goes to first.
public enum ReadPolicy: String, CaseIterable, Sendable {
    /// The first in-sync leg, always (dm-raid1's default mirror); others
    /// only when it fails.
    case first
    /// md's read_balance: a read that continues a leg's last read stays on
    /// that leg (its readahead and its disk head are there) while the leg
    /// keeps up; any other goes to the leg with the fewest reads in flight,
    /// so that a slow or busy leg (a remote one on a far network) gets fewer.
    case balanced
}

/// The read policy and what it keeps per leg: reads in flight, and where
/// the leg's last read ended. Lock-free: a read costs two atomic adds and a
/// store, on a cache line of the leg's own. Balancing is a hint, so the
/// counts are read without ordering: two reads deciding at once may both
/// pick the same leg.
final class ReadBalancer: @unchecked Sendable {
    let policy: ReadPolicy
    /// A leg's slot is a cache line: reads in flight, then the offset just
    /// past its last read (0 ends no read: a leg not read yet continues
    /// nothing).
    private let slots = AtomicWords(count: Superblock.maxLegs * ReadBalancer.slotStride)
    private let words: AtomicWords.Words
    private static let slotStride = 8
    private static let inFlight = 0
    private static let sequentialOffset = 1

    init(policy: ReadPolicy) {
        self.policy = policy
        words = slots.words
    }

    /// The position in `legs` (the in-sync legs' indices, in order) of the
    /// leg to read `offset` from first; the others follow it, in order, if
    /// it fails.
    func choose(offset: UInt64, among legs: some Collection<Int>) -> Int {
        guard policy == .balanced, legs.count > 1 else { return 0 }
        var fewest = 0
        var fewestInFlight = UInt64.max
        var continuing: (position: Int, inFlight: UInt64)?
        for (position, leg) in legs.enumerated() {
            let inFlight = words.load(slot(leg) + Self.inFlight)
            if continuing == nil && offset != 0
                && words.load(slot(leg) + Self.sequentialOffset) == offset {
                continuing = (position, inFlight)
            }
            if inFlight < fewestInFlight {
                fewest = position
                fewestInFlight = inFlight
            }
        }
        if let continuing, continuing.inFlight <= fewestInFlight + Self.streamSlack { return continuing.position }
        return fewest
    }

    /// How many reads more than the least busy leg a stream's leg may have
    /// in flight and keep the stream. md moves a stream to an idle disk
    /// once it is long enough; here, once its leg falls behind: a stream
    /// that began on a slow leg (a remote one) leaves it, and one on a leg
    /// that keeps up stays.
    static let streamSlack: UInt64 = 4

    /// A read of `length` bytes at `offset` goes to leg `index`.
    func started(_ index: Int, offset: UInt64, length: UInt64) {
        guard policy == .balanced else { return }
        words.add(slot(index) + Self.inFlight)
        words.store(slot(index) + Self.sequentialOffset, offset &+ length)
    }

    /// A read that `started` on leg `index` is done.
    func ended(_ index: Int) {
        guard policy == .balanced else { return }
        words.subtract(slot(index) + Self.inFlight)
    }

    private func slot(_ leg: Int) -> Int { leg * Self.slotStride }
}
