import DMIO
import Glibc

/// What a scrub does (md's sync_action `check` and `repair`, DRBD's
/// online verify).
public enum ScrubAction: String, Sendable, Codable, CaseIterable {
    /// Compares the in-sync legs and counts the regions that differ.
    case check
    /// Compares them and rewrites the copies that lose the vote.
    case repair
}

/// Which copy of a region wins, from the copies grouped by content.
enum Vote: Equatable {
    /// Every copy read is the same.
    case agree
    /// More than half of three or more legs hold `winner`'s copy.
    case majority(winner: Int, outvoted: [Int])
    /// Two copies that differ: the first leg's wins, as md's repair has it,
    /// though nothing says that it is the right one.
    case firstOfTwo(winner: Int, outvoted: [Int])
    /// No copy held by more than half of three or more legs, or two legs
    /// whose copies differ while another could not be read: no copy is
    /// guessed at.
    case none

    /// `groups`: the legs with identical copies, each group in leg order and
    /// the groups in the order of their first leg; `legs`: how many legs
    /// are in sync, those that could not be read included. A majority is
    /// of them all: a copy that a read error kept out of the vote might
    /// have been the one the others agree with.
    init(_ groups: [[Int]], of legs: Int) {
        let total = groups.reduce(0) { $0 + $1.count }
        guard groups.count > 1 else {
            self = .agree
            return
        }
        if legs == 2 && total == 2 {
            self = .firstOfTwo(winner: groups[0][0], outvoted: Array(groups.dropFirst().joined()))
            return
        }
        guard let biggest = groups.max(by: { $0.count < $1.count }), biggest.count * 2 > legs else {
            self = .none
            return
        }
        self = .majority(winner: biggest[0], outvoted: groups.filter { $0 != biggest }.joined().sorted())
    }

    /// The leg whose copy the others get, if any.
    var winner: Int? {
        switch self {
        case .agree, .none: nil
        case .majority(let winner, _), .firstOfTwo(let winner, _): winner
        }
    }

    var outvoted: [Int] {
        switch self {
        case .agree, .none: []
        case .majority(_, let outvoted), .firstOfTwo(_, let outvoted): outvoted
        }
    }

    /// The same vote with each leg renamed by `name`.
    func map(_ name: (Int) -> Int) -> Vote {
        switch self {
        case .agree, .none: self
        case .majority(let winner, let outvoted): .majority(winner: name(winner), outvoted: outvoted.map(name))
        case .firstOfTwo(let winner, let outvoted): .firstOfTwo(winner: name(winner), outvoted: outvoted.map(name))
        }
    }
}

/// Reads the in-sync legs' copies of a run of regions that the pass holds
/// (no write can change them meanwhile), compares them region by region,
/// and rewrites what must be: a copy a leg could not read (md rewrites a
/// read error from a good copy, in a check too), and in a repair the copies
/// that lose the vote. Synchronous, like the copier: for the mirror's
/// background thread.
struct Scrubber {
    /// One region whose copies differ.
    struct Mismatch {
        let region: Int
        /// Bytes at which the copies do not all agree.
        let bytes: Int
        /// By leg index.
        let vote: Vote
        /// Whether the losing copies were rewritten.
        let repaired: Bool
    }

    /// A region a leg could not read, and whether a good copy went over it.
    struct ReadError {
        let failure: LegFailure
        let region: Int
        let repaired: Bool
    }

    struct Outcome {
        var mismatches: [Mismatch] = []
        var readErrors: [ReadError] = []
        /// Regions no leg could read.
        var unreadable = 0
        /// Legs that failed a rewrite: they are to be degraded.
        var writeFailures: [LegFailure] = []
    }

    let client: DMIOClient
    let layout: MirrorLayout

    /// Scrubs the regions `regions` (bytes `offset..<offset+length` of the
    /// mirror) of `legs`, reading each leg's copy into its buffer of
    /// `buffers` (as many as legs, each `length` long at least).
    /// `beforeRewrite` runs before a copy goes over another in `region`,
    /// and says whether it may (see `RegionPass`: the region is marked
    /// dirty first while a leg is out).
    func scrub(_ regions: Range<Int>, offset: UInt64, length: UInt64, legs: [LegTable.Leg],
               buffers: [UnsafeMutableRawBufferPointer], repair: Bool, beforeRewrite: (Int) -> Bool) -> Outcome {
        var outcome = Outcome()
        let regionBytes = UInt64(layout.regionBytes)
        var failedRun: [Int: Int32] = [:]
        for (position, leg) in legs.enumerated() {
            if let errno = read(leg, offset: offset, length: length, into: buffers[position]) { failedRun[position] = errno }
        }
        for region in regions {
            let start = UInt64(region - regions.lowerBound) * regionBytes
            let bytes = min(regionBytes, length - start)
            let slices = buffers.prefix(legs.count).map { UnsafeMutableRawBufferPointer(rebasing: $0[Int(start)..<Int(start + bytes)]) }
            // A leg that failed the run's read may read this region: try it alone.
            var unreadable: [Int: Int32] = [:]
            for (position, _) in failedRun {
                if let errno = read(legs[position], offset: offset + start, length: bytes, into: slices[position]) {
                    unreadable[position] = errno
                }
            }
            var readable = legs.indices.filter { unreadable[$0] == nil }
            if readable.isEmpty { outcome.unreadable += 1 }
            var vote = Vote(Self.groups(readable, slices), of: legs.count)
            if vote != .agree {
                // Read again before it counts: only a difference that stays is one.
                for position in readable {
                    if let errno = read(legs[position], offset: offset + start, length: bytes, into: slices[position]) {
                        unreadable[position] = errno
                    }
                }
                readable = legs.indices.filter { unreadable[$0] == nil }
                vote = Vote(Self.groups(readable, slices), of: legs.count)
            }
            // A check rewrites only what a leg could not read, and only from
            // copies that all agree; a repair also what the vote overruled.
            let source = vote == .agree ? readable.first : repair ? vote.winner : nil
            let outvoted = repair ? vote.outvoted : []
            var rewrite = source == nil ? [] : unreadable.keys.sorted() + outvoted
            if !rewrite.isEmpty && !beforeRewrite(region) { rewrite = [] }
            var failedWrites: Set<Int> = []
            if let source, !rewrite.isEmpty {
                let targets = rewrite.map { legs[$0] }
                let regionsOut = targets.map { layout.dataRegion(on: $0.device, offset: offset + start, length: bytes) }
                let written = try? client.sync(.write, regions: regionsOut, buffer: slices[source])
                let failures = written?.legFailures(targets) ?? targets.map { LegFailure(leg: $0, errno: EIO) }
                outcome.writeFailures += failures
                failedWrites = Set(failures.map(\.leg.index))
            }
            if vote != .agree {
                outcome.mismatches.append(Mismatch(
                    region: region, bytes: Self.differingBytes(slices, among: readable), vote: vote.map { legs[$0].index },
                    repaired: !outvoted.isEmpty && rewrite.contains(outvoted[0])
                        && outvoted.allSatisfy { !failedWrites.contains(legs[$0].index) }))
            }
            outcome.readErrors += unreadable.map { position, errno in
                ReadError(failure: LegFailure(leg: legs[position], errno: errno), region: region,
                          repaired: rewrite.contains(position) && !failedWrites.contains(legs[position].index))
            }
        }
        return outcome
    }

    /// Reads `length` bytes of data at `offset` from `leg`; the errno if it failed.
    private func read(_ leg: LegTable.Leg, offset: UInt64, length: UInt64,
                      into buffer: UnsafeMutableRawBufferPointer) -> Int32? {
        let memory = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(length)])
        guard let result = try? client.sync(.read, regions: [layout.dataRegion(on: leg.device, offset: offset, length: length)],
                                            buffer: memory) else { return EIO }
        return result.failures.first?.errno
    }

    /// The positions of `positions` grouped by identical copies in `slices`.
    static func groups(_ positions: [Int], _ slices: [UnsafeMutableRawBufferPointer]) -> [[Int]] {
        var groups: [[Int]] = []
        for position in positions {
            let copy = slices[position]
            if let match = groups.firstIndex(where: { memcmp(slices[$0[0]].baseAddress!, copy.baseAddress!, copy.count) == 0 }) {
                groups[match].append(position)
            } else {
                groups.append([position])
            }
        }
        return groups
    }

    /// How many bytes of the copies at `positions` are not the same in all
    /// of them: a page at a time, byte by byte only in pages that differ.
    static func differingBytes(_ slices: [UnsafeMutableRawBufferPointer], among positions: [Int]) -> Int {
        guard let first = positions.first else { return 0 }
        let reference = slices[first]
        let others = positions.dropFirst().map { slices[$0] }
        var differing = 0
        for page in stride(from: 0, to: reference.count, by: 4096) {
            let end = min(page + 4096, reference.count)
            let differ = others.filter { memcmp(reference.baseAddress! + page, $0.baseAddress! + page, end - page) != 0 }
            guard !differ.isEmpty else { continue }
            for byte in page..<end where differ.contains(where: { $0[byte] != reference[byte] }) { differing += 1 }
        }
        return differing
    }
}
