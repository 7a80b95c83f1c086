import DMIO
import Glibc
import BlockTargets
import Synchronization

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
        let snapshot = legs.snapshot
        // After an unclean stop the legs may differ in their dirty regions
        // until the recovery has copied them from the first: read what it
        // will copy, never what it will overwrite (md reads the first disk
        // where it has not resynced). Write-mostly legs come last, read
        // only when the others fail.
        let first = isRecoveryPending ? 0
            : readBalancer.choose(offset: offset, among: snapshot.readFirstLegs.lazy.map { $0.index })
        read(into: buffer, offset: offset, from: snapshot.readable, first: first, tried: 0, failures: nil,
             on: context.client(or: client), completion: completion)
    }

    /// Reads from the candidate `tried` places after `first` (round the
    /// list); on an error, fails that leg and tries the next. When no
    /// in-sync leg is left, a rebuilding leg serves regions that it already
    /// holds (clean ones). Retries run in the failed read's completion: on
    /// the mirror's own client. `failures` is nil until one: the first
    /// read then captures no array for its retries.
    private func read(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64, from candidates: [LegTable.Leg],
                      first: Int, tried: Int, failures: [LegFailure]?, on io: DMIOClient,
                      completion: @escaping TargetCompletion) {
        var candidates = candidates
        var first = first
        var tried = tried
        if tried == candidates.count, let failures {
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
            return completion(everyLegFailed("read", failures ?? []))
        }
        let position = (first + tried) % candidates.count
        let length = UInt64(buffer.count)
        // A write-mostly leg may not have the writes answered before it had
        // them yet: the read waits for those it overlaps. (The leg is read
        // in place, not copied: a copy counts its device.)
        if candidates[position].writeMostly, !writeBehind.mayStart(offset..<offset + length, resume: { [self, candidates, first, tried] in
            read(into: buffer, offset: offset, from: candidates, first: first, tried: tried, failures: failures,
                 on: client, completion: completion)
        }) { return }
        readBalancer.started(candidates[position].index, offset: offset, length: length)
        let started = submit(.read, regions: [layout.dataRegion(on: candidates[position].device, offset: offset,
                                                                length: length)],
                             memory: .buffer(buffer), on: io) { [self] result, _ in
            // The leg is found again from the candidates: one reference fewer to capture.
            let leg = candidates[position]
            readBalancer.ended(leg.index)
            guard let failure = result.failures.first.map({ LegFailure(leg: leg, errno: $0.errno) }) else {
                return completion(.success)
            }
            legFailures.record([failure], reading: true)
            read(into: buffer, offset: offset, from: candidates, first: first, tried: tried + 1,
                 failures: (failures ?? []) + [failure], on: client, completion: completion)
        }
        if !started {
            readBalancer.ended(candidates[position].index)
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

    /// A flush waits for no leg written behind: what it makes durable is on
    /// the others, and the regions that leg lacks stay dirty until the
    /// cleaner, which flushes every leg, clears them.
    public func flush(context: IOContext, completion: @escaping TargetCompletion) {
        let snapshot = legs.snapshot
        let targets = writesBehind(snapshot) ? snapshot.writable.filter { !$0.isAmong(snapshot.writeMostly) }
                                             : snapshot.writable
        let started = submit(.flush, targets, offset: 0, length: 0,
                             on: context.client(or: client)) { [self] result, _ in
            answer(.flush, sentTo: targets, version: snapshot.version, failures: result.legFailures(targets),
                   completion: completion)
        }
        if !started { completion(TargetResult(errno: EINVAL, message: "flush refused by DMIO")) }
    }

    public func cache(offset: UInt64, length: UInt64, context: IOContext, completion: @escaping TargetCompletion) {
        completion(.success)
    }

    /// From the first leg in sync; a write-mostly one may not hold the
    /// writes still on their way to it, and says data while any is.
    public func allocation(offset: UInt64, length: UInt64, maxExtents: Int) throws -> [Extent] {
        guard let leg = legs.snapshot.readable.first else {
            throw TargetResult(errno: EIO, message: "no leg in sync")
        }
        if leg.writeMostly && writeBehind.outstandingCount > 0 {
            return [Extent(length: UInt32(clamping: length), flags: 0)]
        }
        return try leg.device.extents(offset: layout.dataOffset + offset, length: length, maxExtents: maxExtents)
    }

    public func readsAsZeroes(offset: UInt64, length: UInt64) -> Bool {
        guard let leg = legs.snapshot.readable.first, !(leg.writeMostly && writeBehind.outstandingCount > 0) else {
            return false
        }
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

        var range: Range<UInt64> { offset..<offset + length }
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
        // Asked without binding it: most mirrors hold no lease, and a binding counts a reference.
        if lease?.isValid == false, let lease {
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
        // After a write answered before a write-mostly leg had it (write-behind).
        // Asked only with writes behind: the closure costs an allocation.
        guard !writeBehind.hasOutstanding
              || writeBehind.mayStart(change.range, resume: { [self] in start(change, on: nil) }) else { return }
        // With the default policy (one leg in sync is enough: there is
        // always one) no write asks.
        if redundancy.policy.minInSync > 1 {
            let admission = redundancy.admit(inSync: legsAnswering(legs.snapshot)) { [self] admitted in
                guard admitted else {
                    return change.completion(TargetResult(errno: EIO, message: "the server stopped while the write "
                                                          + "waited for enough legs in sync (--min-in-sync-legs)"))
                }
                startAfterWaiting(change)
            }
            switch admission {
            case .go: break
            case .refused(let result): return change.completion(result)
            case .held:
                // Enough legs may have come back between the count and the
                // parking, after the background thread let the held writes go.
                return redundancy.release(inSync: legsAnswering(legs.snapshot))
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
        var snapshot = legs.snapshot
        if writesBehind(snapshot) {
            let (ticket, full) = writeBehind.reserve(snapshot.writeMostly, range: change.range,
                                                     copying: change.memory?.byteCount ?? 0)
            if !full.isEmpty && writeBehind.policy.onCongestion == .pullAhead {
                pullAhead(full)
                // The write answers once the superblocks record those legs behind.
                snapshot = legs.snapshot
            }
            if let ticket { return issue(change, behind: ticket, snapshot: snapshot, on: io) }
        }
        let started = submit(change.operation, snapshot.writable, offset: change.offset, length: change.length,
                             memory: change.memory, flags: change.flags, on: io) { [self] result, _ in
            answer(change.operation, sentTo: snapshot.writable, version: snapshot.version,
                   failures: result.legFailures(snapshot.writable), completion: change.completion)
            // Only now, with the failed legs degraded: the cleaner must not
            // clear these bits while a leg that missed the write looks in sync.
            regionHash.endWrite(change.regions)
        }
        if !started {
            regionHash.endWrite(change.regions)
            change.completion(TargetResult(errno: EINVAL, message: "\(change.operation) refused by DMIO"))
        }
    }

    /// Whether writes to `snapshot`'s write-mostly legs go behind.
    private func writesBehind(_ snapshot: LegTable.Snapshot) -> Bool {
        snapshot.hasWriteMostly && writeBehind.policy.limit > 0
    }

    /// The legs in sync that a write is answered from (`--min-in-sync-legs`
    /// counts them): not those it may be written behind.
    func legsAnswering(_ snapshot: LegTable.Snapshot) -> Int {
        writesBehind(snapshot) ? snapshot.readFirst : snapshot.readable.count
    }

    /// Issues `change` to the writable legs but those of `ticket`, and from
    /// a copy of its bytes to those: it is answered once the others hold it
    /// (or, when none of them does, once the legs behind have it), and its
    /// regions stay counted, so dirty, until the legs behind have it too.
    private func issue(_ change: Change, behind ticket: WriteBehind.Ticket, snapshot: LegTable.Snapshot,
                       on io: DMIOClient) {
        let front = snapshot.writable.filter { !$0.isAmong(ticket.legs) }
        let copy = change.memory.map { memory in
            let bytes = allocateAligned(memory.byteCount)
            memory.copy(to: bytes)
            return bytes
        }
        let parts = BehindChange()
        let ended = { [self] in
            guard let outcome = parts.end() else { return }
            if outcome.frontHeld {
                legFailures.record(outcome.behindFailures, reading: false)
            } else {
                // No leg in front holds it: the legs behind answer for it (and
                // a rebuild of theirs that alone took it cannot finish on it).
                let settlement = legFailures.settle(outcome.behindFailures, sentTo: ticket.legs)
                if settlement.held { succeed(once: settlement.version, change.completion) }
                else { change.completion(everyLegFailed("\(change.operation)", outcome.failures)) }
            }
            regionHash.endWrite(change.regions)
            // Last, once both halves have ended and the failures of the legs
            // behind are recorded: a stop that waits for the writes behind
            // then sees those legs out, and does not record them in sync.
            writeBehind.ended(ticket)
        }
        let frontStarted = submit(change.operation, front, offset: change.offset, length: change.length,
                                  memory: change.memory, flags: change.flags, on: io) { [self] result, _ in
            let failures = result.legFailures(front)
            let settlement = front.isEmpty ? nil : legFailures.settle(failures, sentTo: front)
            if let settlement, settlement.held { succeed(once: settlement.version, change.completion) }
            parts.frontEnded(held: settlement?.held ?? false, failures: failures)
            ended()
        }
        // On the mirror's own client, whose reaper outlives the event loops:
        // a write behind may still be on its way when the server stops them.
        let behindStarted = frontStarted && submit(change.operation, ticket.legs, offset: change.offset,
                                                   length: change.length, memory: copy.map(IOMemory.buffer),
                                                   flags: change.flags, on: client) { result, _ in
            if let copy { free(copy.baseAddress) }
            parts.behindEnded(failures: result.legFailures(ticket.legs))
            ended()
        }
        if !behindStarted {
            if let copy { free(copy.baseAddress) }
            if frontStarted {
                // The legs behind lack it: out, before its bits can be cleared.
                parts.behindEnded(failures: ticket.legs.map { LegFailure(leg: $0, errno: EIO) })
                ended()
            } else {
                writeBehind.ended(ticket)
                regionHash.endWrite(change.regions)
                change.completion(TargetResult(errno: EINVAL, message: "\(change.operation) refused by DMIO"))
            }
        }
    }

    /// Takes write-mostly legs whose backlog is full out of the writes
    /// (`--on-congestion pull-ahead`): the background thread catches each
    /// up once its backlog has drained (`CatchUpPacing` says when).
    private func pullAhead(_ full: [LegTable.Leg]) {
        let policy = writeBehind.policy
        for leg in full where legs.fallBehind(leg) {
            let line = "leg \(leg.index) (\(leg.device.name)) has \(writeBehind.backlog(of: leg.device)) writes "
                + "outstanding (at most \(policy.limit) per leg and \(policy.maxBytes >> 20) MiB in all): pulled ahead "
                + "of it; it is caught up once they land (--on-congestion pull-ahead)"
            logger.warning("\(line)")
            writeBehind.pulledAhead(leg.device)
        }
    }

    /// Ends a request that went to `targets`: legs that failed are degraded
    /// (and recorded) before the answer. It succeeded if a leg in sync now
    /// holds it; a rebuilding leg alone is not enough, since reads do not
    /// come from it.
    private func answer(_ operation: IOOperation, sentTo targets: [LegTable.Leg], version: UInt64,
                        failures: [LegFailure], completion: @escaping TargetCompletion) {
        // Every leg took it: a leg degraded before it went out must be on record.
        if failures.isEmpty { return succeed(once: version, completion) }
        let settlement = legFailures.settle(failures, sentTo: targets)
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

    /// One DMIO request on `io` to the data area of `targets`; `done` gets
    /// DMIO's result, whose region `i` is `targets[i]` (`legFailures`
    /// names the legs). DMIO's own callback: a closure around it would cost
    /// each request an allocation. Returns false, and calls nothing, when
    /// DMIO refuses the request (it cannot: the server checked it against
    /// the mirror's size), so that no leg is blamed for it.
    private func submit(_ operation: IOOperation, _ targets: [LegTable.Leg], offset: UInt64, length: UInt64,
                        memory: IOMemory? = nil, flags: IOFlags = [], on io: DMIOClient,
                        then done: @escaping IONotify) -> Bool {
        guard !targets.isEmpty else {
            done(.success, nil)
            return true
        }
        // Made for every write, and read only until DMIO's submit returns:
        // on the stack, not in an array on the heap.
        return withUnsafeTemporaryAllocation(of: IORegion.self, capacity: targets.count) { regions in
            for index in targets.indices {
                (regions.baseAddress! + index).initialize(to: layout.dataRegion(on: targets[index].device,
                                                                                offset: offset, length: length))
            }
            defer { regions.deinitialize() }
            return submit(operation, regions: UnsafeBufferPointer(regions), memory: memory, flags: flags, on: io,
                          then: done)
        }
    }

    /// One DMIO request on `io` to `regions`, as `submit` above. (A read's
    /// one region stays in an array: made on the stack, it saved the read
    /// no allocation and cost it three references more.)
    private func submit(_ operation: IOOperation, regions: [IORegion], memory: IOMemory? = nil,
                        flags: IOFlags = [], on io: DMIOClient, then done: @escaping IONotify) -> Bool {
        regions.withUnsafeBufferPointer { regions in
            submit(operation, regions: regions, memory: memory, flags: flags, on: io, then: done)
        }
    }

    private func submit(_ operation: IOOperation, regions: UnsafeBufferPointer<IORegion>, memory: IOMemory? = nil,
                        flags: IOFlags = [], on io: DMIOClient, then done: @escaping IONotify) -> Bool {
        do {
            try io.submit(operation, regions: regions, memory: memory, flags: flags, notify: done)
            return true
        } catch {
            logger.error("\(operation) refused: \(error)")
            return false
        }
    }
}

/// The two parts of a change written behind: the legs it is answered from,
/// and the write-mostly legs behind them. Whichever ends last ends it.
private final class BehindChange: Sendable {
    struct Outcome {
        var frontHeld = false
        var frontFailures: [LegFailure] = []
        var behindFailures: [LegFailure] = []

        var failures: [LegFailure] { frontFailures + behindFailures }
    }

    private let state = Mutex((partsLeft: 2, outcome: Outcome()))

    func frontEnded(held: Bool, failures: [LegFailure]) {
        state.withLock {
            $0.outcome.frontHeld = held
            $0.outcome.frontFailures = failures
        }
    }

    func behindEnded(failures: [LegFailure]) {
        state.withLock { $0.outcome.behindFailures = failures }
    }

    /// Counts a part's end; the outcome once both have ended.
    func end() -> Outcome? {
        state.withLock {
            $0.partsLeft -= 1
            return $0.partsLeft == 0 ? $0.outcome : nil
        }
    }
}

extension LegTable.Leg {
    /// Whether this leg, on its device, is one of `legs`.
    func isAmong(_ legs: [LegTable.Leg]) -> Bool { legs.contains { $0.device === device } }
}
