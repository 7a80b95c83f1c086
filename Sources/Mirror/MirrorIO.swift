import DMIO
import Glibc
import BlockTargets

/// The mirror's I/O path: every write goes to every writable leg in one
/// DMIO request; a read goes to the in-sync leg the read policy picks
/// (`ReadBalancer`) and moves on to the others when it fails. A request
/// whose legs failed answers only once the superblocks record those legs
/// as degraded, so that no restart can take a leg that missed a write for
/// one that has it.
///
/// A request's first I/O goes on the caller's client (`IOContext`: the
/// event loop's own ring); what starts later, from a completion or after a
/// wait, goes on the mirror's own client (see `change`).
extension Mirror {
    public func read(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64, context: IOContext,
                     completion: @escaping TargetCompletion) {
        let candidates = legs.snapshot.readable
        // After an unclean stop the legs may differ in their dirty regions
        // until the recovery has copied them from the first: read what it
        // will copy, never what it will overwrite (md reads the first disk
        // where it has not resynced).
        let first = isRecoveryPending ? 0 : readBalancer.choose(offset: offset, among: candidates.lazy.map(\.index))
        read(into: buffer, offset: offset, from: candidates, first: first, tried: 0, failures: [],
             on: context.client(or: client), completion: completion)
    }

    /// Reads from the candidate `tried` places after `first` (round the
    /// list); on an error, fails that leg and tries the next. When no
    /// in-sync leg is left, a rebuilding leg serves regions that it already
    /// holds (clean ones). Retries run in the failed read's completion: on
    /// the mirror's own client.
    private func read(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64, from candidates: [LegTable.Leg],
                      first: Int, tried: Int, failures: [LegFailure], on io: DMIOClient,
                      completion: @escaping TargetCompletion) {
        var candidates = candidates
        var first = first
        var tried = tried
        if tried == candidates.count, !failures.isEmpty {
            // Rebuilding legs: written, not yet read. Known by device: the
            // legs may have moved since the failed reads.
            let regions = regionHash.regions(offset: offset, length: UInt64(buffer.count))
            let snapshot = legs.snapshot
            candidates = regions.contains(where: bitmap.isDirty) ? [] : snapshot.writable.filter { leg in
                !snapshot.isReadable(leg) && !failures.contains { $0.leg.device === leg.device }
            }
            first = 0
            tried = 0
        }
        guard tried < candidates.count else {
            return completion(everyLegFailed("read", failures))
        }
        let leg = candidates[(first + tried) % candidates.count]
        let length = UInt64(buffer.count)
        readBalancer.started(leg.index, offset: offset, length: length)
        let started = submit(.read, [leg], offset: offset, length: length,
                             memory: .buffer(buffer), on: io) { [self] failed in
            readBalancer.ended(leg.index)
            guard let failure = failed.first else { return completion(.success) }
            legFailures.record([failure], reading: true)
            read(into: buffer, offset: offset, from: candidates, first: first, tried: tried + 1,
                 failures: failures + [failure], on: client, completion: completion)
        }
        if !started {
            readBalancer.ended(leg.index)
            completion(TargetResult(errno: EINVAL, message: "read refused by DMIO"))
        }
    }

    public func write(_ data: IOMemory, offset: UInt64, fua: Bool, context: IOContext,
                      completion: @escaping TargetCompletion) {
        change(.write, offset: offset, length: UInt64(data.byteCount), memory: data,
               flags: .write(fua: fua), context: context, completion: completion)
    }

    /// A trim zeroes, unmapping where a leg can: a discard promises nothing
    /// about what the range reads afterwards, and legs that kept different
    /// bytes there would answer reads differently (see `zeroesCheaply`).
    public func trim(offset: UInt64, length: UInt64, fua: Bool, context: IOContext,
                     completion: @escaping TargetCompletion) {
        writeZeroes(offset: offset, length: length, mayUnmap: true, fua: fua, context: context, completion: completion)
    }

    public func writeZeroes(offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool, context: IOContext,
                            completion: @escaping TargetCompletion) {
        change(.writeZeroes, offset: offset, length: length, flags: .zeroing(mayUnmap: mayUnmap, fua: fua),
               context: context, completion: completion)
    }

    public func flush(context: IOContext, completion: @escaping TargetCompletion) {
        let snapshot = legs.snapshot
        let started = submit(.flush, snapshot.writable, offset: 0, length: 0,
                             on: context.client(or: client)) { [self] failures in
            answer(.flush, snapshot: snapshot, failures: failures, completion: completion)
        }
        if !started { completion(TargetResult(errno: EINVAL, message: "flush refused by DMIO")) }
    }

    public func cache(offset: UInt64, length: UInt64, context: IOContext, completion: @escaping TargetCompletion) {
        completion(.success)
    }

    public func allocation(offset: UInt64, length: UInt64, maxExtents: Int) throws -> [Extent] {
        guard let leg = legs.snapshot.readable.first else {
            throw TargetResult(errno: EIO, message: "no leg in sync")
        }
        return try leg.device.extents(offset: layout.dataOffset + offset, length: length, maxExtents: maxExtents)
    }

    public func readsAsZeroes(offset: UInt64, length: UInt64) -> Bool {
        guard let leg = legs.snapshot.readable.first else { return false }
        return leg.device.isHole(offset: layout.dataOffset + offset, length: length)
    }

    public func beginBatch(context: IOContext) { context.client(or: client).plug() }
    public func endBatch(context: IOContext) { context.client(or: client).unplug() }

    /// A write or a zeroing, as it goes to the legs.
    private struct Change: @unchecked Sendable {
        let operation: IOOperation
        let regions: ClosedRange<Int>
        let offset: UInt64
        let length: UInt64
        let memory: IOMemory?
        let flags: IOFlags
        let completion: TargetCompletion
    }

    /// A write or a zeroing: its regions counted and their bits durable
    /// (mark, then commit), then every writable leg (issue).
    ///
    /// A write whose bits are durable already (most) is issued at once, on
    /// the caller's client. One that cannot go at once (its bits need a
    /// commit, or a copy holds its regions) is issued on the mirror's own
    /// client, where the wait ends: a metadata completion or the copier
    /// (or the caller itself, when the wait is over before it began). The
    /// loop's ring refuses other threads, and going back to the loop would
    /// cost it a wake-up for a write that has just waited for a metadata
    /// write anyway.
    private func change(_ operation: IOOperation, offset: UInt64, length: UInt64, memory: IOMemory? = nil,
                        flags: IOFlags, context: IOContext, completion: @escaping TargetCompletion) {
        let change = Change(operation: operation, regions: regionHash.regions(offset: offset, length: length),
                            offset: offset, length: length, memory: memory, flags: flags, completion: completion)
        // Legs another machine could open: nothing is written once the lease
        // ran out, until it is renewed (or found taken: then never).
        if let lease, !lease.isValid {
            return lease.whenValid { [self] valid in
                guard valid else {
                    return completion(TargetResult(errno: EIO, message: "another server took this mirror's legs over; "
                                                   + "this one writes nothing more"))
                }
                start(change, on: nil)
            }
        }
        start(change, on: context.client(or: client))
    }

    /// Starts a change: on `io` (the caller's) when it can go at once, else
    /// (or when `io` is nil: it waited) on the mirror's own client.
    private func start(_ change: Change, on io: DMIOClient?) {
        let completion = change.completion
        // With the default policy (one leg in sync is enough: there is
        // always one) no write asks.
        if redundancy.policy.minInSync > 1 {
            let admission = redundancy.admit(inSync: legs.snapshot.readable.count) { [self] admitted in
                guard admitted else {
                    return completion(TargetResult(errno: EIO, message: "the server stopped while the write waited "
                                                   + "for enough legs in sync (--min-in-sync-legs)"))
                }
                startAfterWaiting(change)
            }
            switch admission {
            case .go: break
            case .refused(let result): return completion(result)
            case .held:
                // Enough legs may have come back between the count and the
                // parking, after the background thread let the held writes go.
                return redundancy.release(inSync: legs.snapshot.readable.count)
            }
        }
        if let io, regionHash.tryStartWrite(change.regions) { return issue(change, on: io) }
        startAfterWaiting(change)
    }

    private func startAfterWaiting(_ change: Change) {
        switch regionHash.startWrite(change.regions, whenReleased: { [self] in startAfterWaiting(change) }) {
        case .ready:
            issue(change, on: client)
        case .needsCommit:
            bitmapCommit.request { [self] durable in
                guard durable else {
                    regionHash.endWrite(change.regions)
                    return change.completion(TargetResult(errno: EIO, message: "the write-intent bitmap could not be written to any leg"))
                }
                issue(change, on: client)
            }
        case .held:
            break
        }
    }

    private func issue(_ change: Change, on io: DMIOClient) {
        let snapshot = legs.snapshot
        let started = submit(change.operation, snapshot.writable, offset: change.offset, length: change.length,
                             memory: change.memory, flags: change.flags, on: io) { [self] failures in
            answer(change.operation, snapshot: snapshot, failures: failures, completion: change.completion)
            // Only now, with the failed legs degraded: the cleaner must not
            // clear these bits while a leg that missed the write looks in sync.
            regionHash.endWrite(change.regions)
        }
        if !started {
            regionHash.endWrite(change.regions)
            change.completion(TargetResult(errno: EINVAL, message: "\(change.operation) refused by DMIO"))
        }
    }

    /// Ends a request that went to every writable leg of `snapshot`: legs
    /// that failed are degraded (and recorded) before the answer. It
    /// succeeded if a leg in sync now holds it; a rebuilding leg alone is
    /// not enough, since reads do not come from it.
    private func answer(_ operation: IOOperation, snapshot: LegTable.Snapshot, failures: [LegFailure],
                        completion: @escaping TargetCompletion) {
        // Every leg took it: a leg degraded before it went out must be on record.
        if failures.isEmpty { return succeed(once: snapshot.version, completion) }
        let settlement = legFailures.settle(failures, sentTo: snapshot)
        guard settlement.held else { return completion(everyLegFailed("\(operation)", failures)) }
        succeed(once: settlement.version, completion)
    }

    /// Answers success once the superblocks record leg table `version`.
    private func succeed(once version: UInt64, _ completion: @escaping TargetCompletion) {
        if metadata.isDurable(version) { return completion(.success) }
        superblocks.request { durable in
            completion(durable ? .success
                : TargetResult(errno: EIO, message: "no leg could record the failure of another"))
        }
    }

    private func everyLegFailed(_ what: String, _ failures: [LegFailure]) -> TargetResult {
        guard let first = failures.first else {
            return TargetResult(errno: EIO, message: "\(what): no leg left to serve it")
        }
        let errno = failures.allSatisfy { $0.errno == first.errno } ? first.errno : EIO
        let legs = failures.map { "leg \($0.leg.index) (\($0.leg.device.name)): \(errnoDescription($0.errno))" }
        return TargetResult(errno: errno, message: "\(what) failed on every in-sync leg: " + legs.joined(separator: "; "))
    }

    /// One DMIO request on `io` to the data area of `targets`; reports the
    /// legs that failed. Returns false, and calls nothing, when DMIO refuses
    /// the request (it cannot: the server checked it against the mirror's
    /// size), so that no leg is blamed for it.
    private func submit(_ operation: IOOperation, _ targets: [LegTable.Leg], offset: UInt64, length: UInt64,
                        memory: IOMemory? = nil, flags: IOFlags = [], on io: DMIOClient,
                        then done: @escaping ([LegFailure]) -> Void) -> Bool {
        guard !targets.isEmpty else {
            done([])
            return true
        }
        let regions = targets.map { layout.dataRegion(on: $0.device, offset: offset, length: length) }
        do {
            try io.submit(operation, regions: regions, memory: memory, flags: flags) { result, _ in
                done(result.legFailures(targets))
            }
            return true
        } catch {
            logger.error("\(operation) refused: \(error)")
            return false
        }
    }
}
