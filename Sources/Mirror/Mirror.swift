import DMIO
import Glibc
import Logging
import Synchronization
import BlockTargets

/// A dm-raid1-style mirror served as one NBD target: 2 to 64 legs of equal
/// size, each a file, a block device or a remote NBD export. Composed of
/// small services, as dm-raid1 is: the leg table (health), the region
/// bitmap (write-intent, dm-dirty-log) and region hash (writes in flight,
/// copies, dm-region-hash), the metadata store (superblocks and bitmap on
/// every leg), the failure path, and the region pass (resync) over a
/// copier. Every service gets what it uses at init, and none calls back
/// into the mirror: the mirror sequences them. Make one with `Mirror.create`, open
/// it with `Mirror.open`, then `start()`; `stop()` leaves it clean.
public final class Mirror: BlockTarget, @unchecked Sendable {
    public let uuid: MirrorUUID
    public let layout: MirrorLayout
    public let blockSizes: BlockSizes
    public var size: UInt64 { layout.dataBytes }

    let client: DMIOClient
    let logger: Logger
    let legs: LegTable
    let bitmap: RegionBitmap
    let regionHash: RegionHash
    let metadata: MetadataStore
    /// Where every leg failure goes.
    let legFailures: LegFailures
    /// Group commits of the superblocks and of the bitmap pages that changed.
    let superblocks: GroupCommit
    let bitmapCommit: GroupCommit
    private let deviceOptions: DeviceOptions
    /// Held while the mirror is open: no other process may open it.
    private let exclusive: MirrorLock
    /// Resync passes, on the background thread.
    let pass: RegionPass
    /// Which in-sync leg each read goes to.
    let readBalancer: ReadBalancer
    public var readPolicy: ReadPolicy { readBalancer.policy }
    /// Whether a write may go to the legs with as few in sync as now.
    let redundancy: RedundancyGuard
    /// The writes outstanding to write-mostly legs after their answer.
    let writeBehind: WriteBehind

    private let lock: ConditionLock
    /// Held by whatever changes the set of legs or clears dirty bits, so that
    /// the cleaner never clears a bit that a leg coming in still needs.
    private let maintenance = ConditionLock()
    /// Set when the last stop was not clean: in-sync legs may differ in the
    /// dirty regions, so they are copied from the first one.
    /// Read without the lock too: while it is set, reads come from the
    /// leg the recovery copies from (see `Mirror.read`).
    private let recoveryPending: Atomic<Bool>
    private var stopping = false
    /// How soon a remote leg that went away is tried again (nil: never).
    private let reconnectAfter: Duration?
    /// The hold on legs another machine could open, if this server keeps one.
    let lease: Lease?
    private let ownership: Ownership
    /// The server on another machine this one takes the legs over from.
    private let takenOver: TakenOver?
    private var leaseKeeper: pthread_t?
    /// Whether the last renewal was said to be too slow (renewals run on
    /// the lease keeper, or in `stop` after it ended).
    private var toldSlowRenewal = false
    /// The event of this server's first superblock (its claim of the legs).
    private var leaseStart: UInt64 = 0
    /// What the mirror tells its event sink.
    let announce: MirrorEvents
    /// The scrub asked for, until it ends; and whether it was asked to stop.
    private var scrubAsked: ScrubAction?
    private var scrubCancelled = false
    private var worker: pthread_t?
    /// How often the dirty log's idle bits are cleared.
    static let cleanInterval = Duration.seconds(2)

    init(uuid: MirrorUUID, layout: MirrorLayout, members: [LegTable.Member], bitmap: [UInt8]?,
         events: UInt64, eventsCleared: UInt64, generation: UInt64, recoveryPending: Bool, exclusive: MirrorLock,
         client: DMIOClient, deviceOptions: DeviceOptions, rateLimit: UInt64, readPolicy: ReadPolicy,
         redundancy: RedundancyPolicy, reconnectAfter: Duration?, ownership: Ownership, takenOver: TakenOver?,
         writeBehind: WriteBehindPolicy, eventSink: (any EventSink)?, logger: Logger) {
        self.reconnectAfter = reconnectAfter
        self.ownership = ownership
        self.takenOver = takenOver
        let lease = ownership.holdsLease ? ownership.me.map(Lease.init(owner:)) : nil
        self.lease = lease
        self.uuid = uuid
        self.exclusive = exclusive
        self.layout = layout
        self.client = client
        self.logger = logger
        self.deviceOptions = deviceOptions
        self.recoveryPending = Atomic(recoveryPending)
        readBalancer = ReadBalancer(policy: readPolicy)
        self.redundancy = RedundancyGuard(policy: redundancy)
        let lock = ConditionLock()
        self.lock = lock
        // A leg pulled ahead whose backlog drained is caught up by the background thread.
        self.writeBehind = WriteBehind(policy: writeBehind) { lock.broadcast() }
        let announce = MirrorEvents(sink: eventSink, mirror: "\(uuid)")
        self.announce = announce
        legs = LegTable(members, generation: generation) { before, after in announce.legsChanged(from: before, to: after) }
        let bitmap = RegionBitmap(regionCount: layout.regionCount, bitmap: bitmap)
        self.bitmap = bitmap
        regionHash = RegionHash(regionBytes: layout.regionBytes, bitmap: bitmap)
        let metadata = MetadataStore(layout: layout, mirror: uuid, events: events, eventsCleared: eventsCleared,
                                     legs: legs, bitmap: bitmap, client: client, lease: lease,
                                     writeBehind: writeBehind.limit > 0, announce: announce)
        self.metadata = metadata
        let legFailures = LegFailures(legs: legs, metadata: metadata, logger: logger)
        self.legFailures = legFailures
        superblocks = legFailures.superblocks
        let bitmapCommit = GroupCommit { done in
            let pages = bitmap.changedPages()
            metadata.writeBitmap(pages.map { ($0.index, $0.bytes) },
                                 behindFailed: { legFailures.record($0, reading: false) }) { written in
                legFailures.record(written.failures, reading: false)
                if written.durable { bitmap.written(pages) }
                done(written.durable, false)
            }
        }
        self.bitmapCommit = bitmapCommit

        blockSizes = .over(deviceBlockSize: members.compactMap(\.device).map(\.blockSize).max() ?? sectorSize)
        pass = RegionPass(bitmap: bitmap, regionHash: regionHash, legs: legs,
                          copier: Copier(client: client, layout: layout),
                          scrubber: Scrubber(client: client, layout: layout), failures: legFailures,
                          markDirty: { regions in bitmap.mark(regions) || bitmapCommit.commitAndWait() },
                          rateLimit: rateLimit, events: announce, logger: logger)
    }

    /// Decided from the legs written now, for each new connection: a leg
    /// replaced or re-added may zero less cheaply than the one before it
    /// (connections that were offered trim keep it, and their trims still
    /// zero every leg).
    public var capabilities: TargetCapabilities {
        let devices = legs.snapshot.writable.map(\.device)
        var capabilities: TargetCapabilities = [.flush, .fua, .cache, .multiConnection, .writeZeroes]
        if devices.allSatisfy({ $0.kind == .file }) { capabilities.insert(.fastZero) }
        if devices.allSatisfy(\.zeroesCheaply) { capabilities.insert(.trim) }
        return capabilities
    }

    // MARK: Running

    /// Marks the mirror in use on every leg (a crash from now on means a
    /// recovery at the next start) and starts the background work: resync
    /// and the clearing of idle dirty bits.
    public func start() throws(MirrorError) {
        if let takenOver { try refuseIfMoved(since: takenOver) }
        metadata.setClean(false)
        metadata.setOwner(lease?.owner)
        // The first claim of the legs: open watched any other owner's lease.
        let leaseFrom = ContinuousClock.now
        metadata.claiming(true)
        defer { metadata.claiming(false) }
        // Legs that were stale or re-added get the whole bitmap.
        let whole = [(page: 0, bytes: bitmap.image(bitmapBytes: layout.bitmapBytes))]
        let wrote = waitForCallback { done in
            metadata.writeBitmap(whole, behindFailed: nil) { [legFailures] written in
                legFailures.record(written.failures, reading: false)
                done(written.durable)
            }
        }
        guard wrote, superblocks.commitAndWait() else {
            throw .metadataIO(leg: "every leg", errno: EIO)
        }
        if let takenOver { try completeTakeover(from: takenOver) }
        // Write-mostly legs get their bitmap behind once both slots say so:
        // from the first write on, not after a first round trip to them.
        if metadata.pagesBehind.isRecordWrong(legs.snapshot) { _ = superblocks.commitAndWait() }
        if let lease {
            lease.renewed(startedAt: leaseFrom)
            leaseStart = metadata.eventCount
            let start = leaseStart
            leaseKeeper = startThread(named: "dmio-lease") { [self] in hold(lease, since: start) }
        }
        if let shortfall = redundancy.shortfall(inSync: legs.snapshot.readable.count) { logger.warning("\(shortfall)") }
        worker = startThread(named: "dmio-mirror") { [self] in background() }
        if let reconnectAfter {
            // Not joined at a stop: a try may wait for a server that does not
            // answer, for up to --remote-timeout; a stop does not wait for it.
            let retrier = startThread(named: "dmio-reconnect") { [self] in retryRemoteLegs(first: reconnectAfter) }
            pthread_detach(retrier)
        }
    }

    /// Stops the background work, flushes every leg and, when the legs are
    /// in sync, clears the bitmap and records a clean stop. Call after the
    /// server has answered every request: no write behind starts after
    /// that, so the count of them at the start only goes down.
    public func stop() {
        // Told first: the joins below may already wait behind these writes
        // (a lease renewal queued after them on a slow leg).
        let behind = writeBehind.outstandingCount
        if behind > 0 { logger.info("waiting for \(behind) writes behind to reach the write-mostly legs") }
        lock.withLock { stopping = true }
        lock.broadcast()
        if let worker { pthread_join(worker, nil) }
        if let leaseKeeper { pthread_join(leaseKeeper, nil) }
        worker = nil
        leaseKeeper = nil
        // A leg change under way ends first; none starts from now on.
        maintenance.withLock {}
        stopHoldingWrites()
        // Answered writes still on their way to write-mostly legs: the legs
        // are recorded clean only once every one has them (or failed them:
        // a leg that hangs fails them after --remote-timeout).
        writeBehind.waitUntilDrained()
        // A lease that lapsed (a leg stalled the last renewals) is renewed
        // first, as it would be while serving; metadata is written only
        // under a valid lease, else the legs stay as they are: in use, and
        // recovered at the next start.
        if let lease, !lease.isValid, !lease.isFenced { _ = renew(lease, since: leaseStart) }
        metadata.pagesBehind.stop()
        let before = legs.snapshot
        let flushed = flushLegs()
        let recovering = isRecoveryPending
        if flushed && legs.allInSync && !recovering {
            clearBits(flushedSince: before) { regionHash.clearAllIdle() }
        }
        // A recovery cut short must run again at the next start. The legs
        // are nobody's once stopped cleanly: another machine may start at once.
        metadata.setClean(!recovering)
        if !recovering { metadata.setOwner(nil) }
        let bitmapWritten = bitmapCommit.commitAndWait()
        let recorded = superblocks.commitAndWait()
        let how = bitmapWritten && recorded ? "cleanly"
            : lease?.isFenced == true ? "without writing its metadata (another server took the legs over)"
            : lease?.isValid == false ? "without writing its metadata (its lease on the legs lapsed)"
            : "but its metadata could not be written"
        logger.info("mirror \(uuid) stopped \(how); \(bitmap.dirtyCount) dirty regions")
        exclusive.release()
    }

    /// Writes held for want of legs in sync fail now, and no write is held
    /// from now on: the server is stopping, and waits for its requests.
    public func stopHoldingWrites() {
        redundancy.close()
    }

    private func background() {
        var lastClean = ContinuousClock.now
        while true {
            let stop = lock.withLock { stopping }
            let recover = isRecoveryPending
            if stop { return }
            redundancy.release(inSync: legsAnswering(legs.snapshot))
            catchUpLegsBehind()
            let rebuilding = legs.all.contains { $0.state == .rebuilding }
            if recover || rebuilding {
                runResync(recovery: recover)
                continue
            }
            if let scrub = lock.withLock({ scrubAsked }) {
                runScrub(scrub)
                continue
            }
            let now = ContinuousClock.now
            if now - lastClean >= Self.cleanInterval {
                lastClean = now
                cleanIdleRegions()
                if metadata.pagesBehind.isRecordWrong(legs.snapshot) { _ = superblocks.commitAndWait() }
            }
            // Until the next clearing, or a leg pulled ahead may be caught up.
            let nextClean = lastClean + Self.cleanInterval
            let until = writeBehind.nextCatchUp.map { min($0, nextClean) } ?? nextClean
            lock.withLock {
                if !stopping && !isRecoveryPending && scrubAsked == nil {
                    lock.wait(for: max(.milliseconds(50), ContinuousClock.now.duration(to: until)))
                }
            }
        }
    }

    /// A recovery copies the dirty regions from the first in-sync leg (the
    /// source) to every other writable leg; a rebuild copies them to the
    /// rebuilding legs. A leg re-added during a pass waits for the next one,
    /// and so does a pass during which a rebuilding leg took a write that
    /// the in-sync legs refused.
    private func runResync(recovery: Bool) {
        let snapshot = legs.snapshot
        let source = snapshot.readable.first
        let rebuilding = LegTable.Targets(snapshot.writable.filter { !snapshot.isReadable($0) })
        let targets = recovery
            ? LegTable.Targets(snapshot.writable.filter { $0.index != source?.index })
            : rebuilding
        if targets.isEmpty {
            // Nothing to copy to: the dirty bits stay for the degraded legs.
            recoveryPending.store(false, ordering: .releasing)
            return
        }
        legs.beginRebuildPass()
        let stopping = { [self] in lock.withLock { self.stopping } || lease?.isValid == false }
        let complete = pass.resync(reason: recovery ? "recovery after an unclean stop" : "rebuild",
                                   targets: targets, stopping: stopping)
        if lock.withLock({ self.stopping }) { return }
        if complete {
            flushLegs()
            // nil: a rebuilding leg got ahead of the in-sync legs during the pass.
            let finished: Bool = maintenance.withLock {
                guard let rebuilt = legs.finishRebuilds(rebuilding) else { return false }
                if recovery { recoveryPending.store(false, ordering: .releasing) }
                if !rebuilt.inSync.isEmpty {
                    logger.info("legs \(rebuilt.inSync) are in sync")
                    for index in rebuilt.inSync {
                        if let device = legs.member(index).device { writeBehind.inSync(device) }
                    }
                    // The others stop listing a replaced leg before it is told it left.
                    if superblocks.commitAndWait() {
                        for old in rebuilt.retired { retire(old, why: "replaced") }
                    }
                }
                return true
            }
            if finished { return }
        }
        // The source failed, or the pass was spoiled: try again later (an
        // operator may change legs meanwhile).
        lock.withLock { if !self.stopping { lock.wait(for: .seconds(5)) } }
    }

    /// A scrub goes through every region once, unless the server stops, an
    /// operator cancels it, or legs need a resync (which comes first: a
    /// scrub compares legs in sync).
    private func runScrub(_ action: ScrubAction) {
        let interrupted = { [self] in
            lock.withLock { stopping || scrubCancelled } || isRecoveryPending || legs.all.contains { $0.state == .rebuilding }
                || lease?.isValid == false
        }
        _ = pass.scrub(action, stopping: interrupted)
        lock.withLock {
            scrubAsked = nil
            scrubCancelled = false
        }
    }

    // MARK: Holding the legs (a lease)

    /// Renews the lease every fifth of it while the mirror runs, until the
    /// legs turn out to be another server's.
    private func hold(_ lease: Lease, since start: UInt64) {
        while renew(lease, since: start) {
            let stop = lock.withLock {
                if !stopping { lock.wait(for: lease.renewInterval) }
                return stopping
            }
            if stop { return }
        }
    }

    /// One renewal: reads the superblocks (both slots) of the legs in sync,
    /// and writes the next one unless another server wrote one since this
    /// server started (`since`, its first event): then the legs were taken
    /// over, and this server is fenced and told to stop (returns false).
    /// After a lapse (it was frozen, or its legs stalled) nothing is renewed,
    /// and the waiting writes go nowhere, until a leg could be read.
    private func renew(_ lease: Lease, since start: UInt64) -> Bool {
        let started = ContinuousClock.now
        guard let read = stillHeld(lease, since: start) else { return false }
        guard lease.isValid || read else { return true }
        metadata.permitRenewal(true)
        let written = superblocks.commitAndWait()
        metadata.permitRenewal(false)
        guard written else { return true }
        // A renewal on the legs while the lease held is this server's: no
        // other could claim them meanwhile. One that landed after it ran out
        // may have come after another server's claim (this one was frozen
        // between its read and its write): it counts only once a read
        // after it finds the legs still this server's. A standby's claim
        // fills both slots, and this one superblock can fill one only.
        if !lease.isValid {
            guard let confirmed = stillHeld(lease, since: start) else { return false }
            guard confirmed else { return true }
        }
        lease.renewed(startedAt: started)
        // Writes that wait go on only under a valid lease: say why they wait.
        let tooSlow = !lease.isValid
        if tooSlow && !toldSlowRenewal {
            let slow = "renewing the lease on the legs took \(ContinuousClock.now - started), more than the lease "
                + "(\(lease.owner.lease)): writes wait for a renewal that takes less (raise --lease?)"
            logger.warning("\(slow)")
        }
        toldSlowRenewal = tooSlow
        return true
    }

    /// Whether a leg in sync could be read, or nil once this server is
    /// fenced: another server wrote the legs since this one started (`start`,
    /// its first event). Not the server it took them over from: that one
    /// holds no lease since, and a superblock of it that lands late is
    /// stale; the next renewal comes after it.
    private func stillHeld(_ lease: Lease, since start: UInt64) -> Bool? {
        let scan = scanSuperblocks()
        if let newest = scan.all.map(\.events).max() { metadata.advanceEvents(past: newest) }
        let found = scan.all.first { superblock in
            superblock.events > start && !isWritten(superblock, by: lease.owner)
                && !(takenOver.map { isWritten(superblock, by: $0.owner) } ?? false)
        }
        guard let found else { return !scan.legs.isEmpty }
        let other = found.owner
        lease.fence()
        let reason = "the legs are \(other.map { "held by the server on \($0)" } ?? "no longer this server's") "
            + "now: another server took them over (this one's lease ran out: it was stopped or cut off for "
            + "longer than \(lease.owner.lease)); it writes nothing more, and stops"
        logger.error("\(reason)")
        announce.ownershipLost(owner: other)
        ownership.lost(reason)
        return nil
    }

    /// Refuses the legs taken over, before writing anything, if they were
    /// written since they were watched: their server renewed its lease
    /// (it is alive), or stopped.
    private func refuseIfMoved(since previous: TakenOver) throws(MirrorError) {
        let scan = scanSuperblocks()
        guard !scan.legs.isEmpty else { throw .metadataIO(leg: "every leg", errno: EIO) }
        // The newest says how it ended: a server that renewed and then stopped cleanly is stopped.
        if let moved = scan.all.filter({ $0.events > previous.event }).max(by: { $0.events < $1.events }) {
            throw .takeoverRaced(owner: moved.owner)
        }
    }

    /// Claims the legs in both superblock slots, then waits out the lease
    /// of the server taken over from, before anything is served.
    private func completeTakeover(from previous: TakenOver) throws(MirrorError) {
        // A renewal of that server, held on its way when it froze, lands on
        // one slot: the other tells it that it lost the legs.
        guard superblocks.commitAndWait() else { throw .metadataIO(leg: "every leg", errno: EIO) }
        // A renewal of that server that read the legs before this claim
        // counts from before it: past its lease (and a fifth, for clocks
        // that run at other rates) it holds none, and every renewal it
        // tries reads this claim first, as long as a slot of each leg
        // still holds it.
        let wait = previous.owner.lease + previous.owner.lease / 5
        logger.info("the legs are claimed; waiting \(wait) for any lease of the server on \(previous.owner) to run out")
        pause(for: wait)
        let scan = scanSuperblocks()
        let isMine = { [lease] (superblock: Superblock) in
            lease.map { self.isWritten(superblock, by: $0.owner) } ?? (superblock.owner == nil)
        }
        let since = scan.all.filter { $0.events > previous.event }
        // That server overwrote the claim on a leg (it stays fenced only
        // while it can read the claim), or a third server claims too.
        if scan.legs.isEmpty || !scan.legs.allSatisfy({ $0.contains { $0.events > previous.event && isMine($0) } })
            || since.contains(where: { !isMine($0) && !isWritten($0, by: previous.owner) }) {
            lease?.fence()
            let other = since.first { !isMine($0) }?.owner ?? previous.owner
            throw .claimOverwritten(owner: other)
        }
        // It wrote the legs as they were taken over (it came back): its last
        // writes may be on some legs only, and its dirty bits under this
        // server's. Every region is copied from the first leg.
        guard since.contains(where: { isWritten($0, by: previous.owner) }) else { return }
        let reason = "the server on \(previous.owner) wrote the legs as this one took them over: it stops once it "
            + "reads this one's claim; every region is copied from the first leg in sync"
        logger.warning("\(reason)")
        bitmap.markAll()
        recoveryPending.store(true, ordering: .releasing)
        guard bitmapCommit.commitAndWait() else { throw .metadataIO(leg: "every leg", errno: EIO) }
    }

    /// The superblocks of this mirror, both slots, of each leg in sync that
    /// could be read (none read: no leg). Not the write-mostly legs while
    /// others are in sync: a read there waits behind their backlog, and
    /// another server writes every leg.
    private func scanSuperblocks() -> (legs: [[Superblock]], all: [Superblock]) {
        let legs = legs.snapshot.readFirstLegs.compactMap { leg -> [Superblock]? in
            guard let slots = try? MetadataStore.readSlots(leg.device, client: client) else { return nil }
            return slots.compactMap { slot in
                guard case .superblock(let superblock) = slot, superblock.mirror == uuid else { return nil }
                return superblock
            }
        }
        return (legs, legs.flatMap { $0 })
    }

    /// Whether `superblock` names `owner`'s server as its writer.
    private func isWritten(_ superblock: Superblock, by owner: MirrorOwner) -> Bool {
        superblock.owner?.isSameServer(as: owner) ?? false
    }

    // MARK: Remote legs that come back

    /// Tries again, with a backoff, each remote leg that went out because
    /// its connection was lost; re-adds it once its server answers and its
    /// superblock says it is that leg, in this mirror, not used elsewhere
    /// meanwhile. Anything else the server answers with is refused for good
    /// (logged, and a `reconnect leg … result:refused` event).
    private func retryRemoteLegs(first: Duration) {
        var retry = RemoteLegRetry(first: first)
        // Said once a leg: the tries after the first are quiet.
        var toldWaiting: Set<MirrorUUID> = []
        while true {
            let lost = legs.all.filter(\.lostItsConnection)
            retry.track(lost.map(\.uuid), now: .now)
            for member in lost where retry.action(for: member.uuid, now: .now) == .tryNow {
                do {
                    try readd(member.uuid, if: \.lostItsConnection)
                    logger.info("remote leg \(member.name) answers again: re-added")
                } catch {
                    // Failed or re-added by the operator meanwhile: no longer the retries' to take back.
                    guard legs.all.contains(where: { $0.uuid == member.uuid && $0.lostItsConnection }) else { continue }
                    switch error {
                    case .foreignLeg, .usedAlone, .notAMirror, .corruptLeg, .replacedLeg, .removedLeg, .sizeChanged:
                        retry.refuse(member.uuid)
                        logger.error("remote leg \(member.name) answers, but is not taken back: \(error)")
                        announce.reconnectRefused(leg: legs.index(of: member.uuid) ?? -1, device: member.name,
                                                reason: "\(error)")
                    default:
                        retry.failed(member.uuid, now: .now)
                        if toldWaiting.insert(member.uuid).inserted {
                            let line = "remote leg \(member.name) does not answer yet (\(error)): trying again, "
                                + "less and less often, up to once a minute"
                            logger.info("\(line)")
                        }
                    }
                }
            }
            let wait = min(retry.nextDue(now: .now) ?? .seconds(1), .seconds(1))
            let stop = lock.withLock {
                if !stopping { lock.wait(for: max(wait, .milliseconds(10))) }
                return stopping
            }
            if stop { return }
        }
    }

    // MARK: Scrubbing

    /// Starts a check or a repair of every region in the background (md's
    /// `echo check > sync_action`); its progress and findings are in the
    /// status. Refused while another runs, while a resync is due, and with
    /// fewer than two legs in sync.
    public func startScrub(_ action: ScrubAction) throws(MirrorError) {
        let inSync = legs.snapshot.readable.count
        guard inSync >= 2 else {
            throw .scrubRefused("a \(action) compares the legs in sync, and \(inSync) is: nothing to compare")
        }
        guard !isRecoveryPending && !legs.all.contains(where: { $0.state == .rebuilding }) else {
            throw .scrubRefused("a resync is under way: \(action) once the legs are in sync")
        }
        lock.lock()
        defer { lock.unlock() }
        if let running = scrubAsked {
            throw .scrubRefused("a \(running) is under way already (`dmio-nbd check --cancel` stops it)")
        }
        guard !stopping else { throw .scrubRefused("the server is stopping") }
        scrubAsked = action
        pass.prepareScrub(action)
        logger.info("\(action) of every region asked for")
        lock.broadcast()
    }

    /// Stops the check or repair under way; what it found so far stays in
    /// the status.
    public func cancelScrub() throws(MirrorError) {
        lock.lock()
        defer { lock.unlock() }
        guard let running = scrubAsked else { throw .scrubRefused("no check or repair is under way") }
        scrubCancelled = true
        logger.info("\(running) cancelled")
    }

    var isScrubAsked: Bool { lock.withLock { scrubAsked != nil } }

    /// Clears the bits of regions idle for a while, once the legs hold their
    /// data durably (a flush first), when every leg is in sync.
    private func cleanIdleRegions() {
        // Clearing bits is a write too: not without a valid lease.
        guard lease?.isValid ?? true else { return }
        maintenance.withLock {
            let before = legs.snapshot
            guard legs.allInSync else { return }
            let candidates = regionHash.idleDirtyRegions()
            guard !candidates.isEmpty, flushLegs() else { return }
            if clearBits(flushedSince: before, { regionHash.clearIdle(candidates) }) > 0 {
                _ = bitmapCommit.commitAndWait()
            }
        }
    }

    /// Clears bits with `clear` once every leg in sync at `before` has been
    /// flushed since and has taken a superblock after the flush: a leg that
    /// holds that superblock holds the data of the bits cleared, and an
    /// older copy of a leg cannot be caught up from the bitmap. That event
    /// is on record (a second superblock) before the bits are cleared: any
    /// bitmap commit may carry them from then on. A leg that fails a write
    /// after the first superblock is thus only behind. Nothing is cleared
    /// when a leg failed meanwhile: it still needs the bits.
    @discardableResult
    private func clearBits(flushedSince before: LegTable.Snapshot, _ clear: () -> Int) -> Int {
        guard superblocks.commitAndWait() else { return 0 }
        let marked = metadata.lastDurableEvent
        guard legs.snapshot.version == before.version else { return 0 }
        metadata.noteBitsCleared(heldSince: marked)
        guard superblocks.commitAndWait(), legs.snapshot.version == before.version else { return 0 }
        return clear()
    }

    /// Flushes every writable leg; returns whether all of them flushed.
    @discardableResult
    private func flushLegs() -> Bool {
        let targets = legs.snapshot.writable
        let regions = targets.map { IORegion(device: $0.device, sector: 0, count: 0) }
        guard !regions.isEmpty, let result = try? client.sync(.flush, regions: regions) else { return false }
        legFailures.record(result.legFailures(targets), reading: false)
        return result.succeeded
    }

    var isRecoveryPending: Bool { recoveryPending.load(ordering: .acquiring) }

    private func wake() {
        lock.broadcast()
    }

    /// Brings back each leg pulled ahead (`--on-congestion pull-ahead`)
    /// once it has no write outstanding: a resync copies it the regions
    /// written since, which stayed dirty. At a start too, after a stop
    /// that left one behind.
    private func catchUpLegsBehind() {
        for member in legs.all where member.state == .degraded && member.cause == .behind {
            guard let device = member.device, writeBehind.mayCatchUp(device) else { continue }
            guard (try? changingLegs(nil)) != nil else { return }
            defer { maintenance.unlock() }
            guard let index = legs.index(of: member.uuid), legs.member(index).cause == .behind,
                  legs.member(index).device === device else { continue }
            do {
                // As a re-added leg: one used elsewhere meanwhile is not taken back.
                let fullCopy = try needsFullCopy(device, comingBackAs: index, member: legs.member(index))
                writeBehind.catchingUp(device)
                try bringIn(.at(index), device: device, uuid: member.uuid, fullCopy: fullCopy)
            } catch {
                // Out for good, until an operator's readd-leg judges it again.
                legs.fail(LegTable.Leg(index: index, device: device), errno: EIO, reading: false)
                logger.error("leg \(index) (\(member.name)) could not be caught up: \(error)")
            }
        }
    }

    // MARK: Changing legs

    /// Marks leg `index` write-mostly (read only when no other leg in sync
    /// can be, and written behind with `--write-behind`), or not; recorded
    /// in the superblocks.
    public func setWriteMostly(_ index: Int, _ writeMostly: Bool) throws(MirrorError) {
        try changingLegs(index)
        defer { maintenance.unlock() }
        let member = legs.member(index)
        guard member.writeMostly != writeMostly else { return }
        // Not write-mostly from here on (or still, if this fails): its bitmap
        // is no longer sent with the others' for that reason.
        defer { if !writeMostly, let device = member.device { metadata.pagesBehind.sendWithOthers(device, false) } }
        if let device = member.device {
            if writeMostly {
                writeBehind.open(device)
            } else {
                // Read from once it is not write-mostly: first it is written
                // as the others are, and what is on its way to it lands.
                writeBehind.close(device)
                writeBehind.waitUntilDrained(device)
                // Pages that changed on their way to it go with the others now.
                metadata.pagesBehind.sendWithOthers(device, true)
                metadata.pagesBehind.waitUntilLanded(device)
                guard bitmapCommit.commitAndWait() else { throw .metadataIO(leg: "every leg", errno: EIO) }
            }
        }
        guard try legs.setWriteMostly(index, writeMostly) else { return }
        logger.info("leg \(index) (\(legs.member(index).name)) is \(writeMostly ? "" : "no longer ")write-mostly")
        guard superblocks.commitAndWait() else { throw .metadataIO(leg: "every leg", errno: EIO) }
    }

    /// Takes leg `index` out of the mirror, as if it had failed.
    public func failLeg(_ index: Int) throws(MirrorError) {
        try changingLegs(index)
        defer { maintenance.unlock() }
        try checkNotLastAnswering(index)
        try legs.failByOperator(index, retriesLostLegs: reconnectAfter != nil)
        logger.warning("leg \(index) (\(legs.member(index).name)) failed by the operator")
        guard superblocks.commitAndWait() else { throw .metadataIO(leg: "every leg", errno: EIO) }
    }

    /// Brings degraded leg `index` back: it is opened again and gets the
    /// regions written while it was away, or everything when no bitmap can
    /// say what it misses. Refused for a leg used without the legs in sync;
    /// a refused leg stays degraded, its device still claimed.
    public func readdLeg(_ index: Int) throws(MirrorError) {
        try changingLegs(index)
        let uuid = legs.member(index).uuid
        maintenance.unlock()
        try readd(uuid)
    }

    /// Re-adds the degraded leg whose UUID is `uuid`, if it is `wanted`
    /// (the retries take back only a leg still out for its lost connection:
    /// not one the operator failed meanwhile). Its device is opened outside
    /// the maintenance lock (a remote leg may take its time to answer), and
    /// the leg found again by UUID after: the legs may move.
    private func readd(_ uuid: MirrorUUID,
                       if wanted: (LegTable.Member) -> Bool = { _ in true }) throws(MirrorError) {
        maintenance.lock()
        let member: LegTable.Member
        do throws(MirrorError) {
            guard let index = legs.index(of: uuid) else { throw MirrorError.invalidLegChange("that leg left the mirror") }
            guard wanted(legs.member(index)) else { throw MirrorError.invalidLegChange("that leg changed") }
            let released = legs.member(index).device
            member = try legs.releaseDevice(of: index)
            if let released { metadata.pagesBehind.forget(released) }
        } catch {
            maintenance.unlock()
            throw error
        }
        maintenance.unlock()
        let device = try reopen(member.name)
        try changingLegs(nil)
        defer { maintenance.unlock() }
        // Re-added meanwhile (by an operator and by the retries at once), or
        // failed again by the operator.
        guard let index = legs.index(of: uuid), legs.member(index).state == .degraded, legs.member(index).device == nil,
              legs.member(index).cause == member.cause else {
            throw .invalidLegChange("\(member.name) was re-added or changed while it was opened again")
        }
        do {
            // Writes that failed in the page cache while the leg was failing are
            // reported once more, to the first sync of a new file handle. Those
            // regions are dirty and get copied again: take that report here.
            _ = try? client.sync(.flush, regions: [IORegion(device: device, sector: 0, count: 0)])
            let fullCopy = try needsFullCopy(device, comingBackAs: index, member: member)
            try bringIn(.at(index), device: device, uuid: member.uuid, fullCopy: fullCopy)
        } catch {
            legs.keepDevice(device, ofDegraded: index)
            throw error
        }
    }

    /// Whether `device`, coming back as leg `index`, must be copied in full
    /// rather than from the bitmap; throws when it must not come back.
    private func needsFullCopy(_ device: BlockDevice, comingBackAs index: Int,
                               member: LegTable.Member) throws(MirrorError) -> Bool {
        guard let found = try Mirror.readSuperblock(of: device, client: client) else {
            throw .notAMirror(leg: device.name)
        }
        guard found.mirror == uuid else { throw .foreignLeg(leg: device.name, belongsTo: found.mirror, expected: uuid) }
        // By UUID: a leg that was out when the legs moved has an old index.
        guard found.own.uuid == member.uuid else {
            throw .replacedLeg(leg: device.name, index: index, mirror: uuid, now: member.name)
        }
        // A leg written since it was failed was used without the legs now in
        // sync: it may hold newer data, and a partial copy would mix. Where
        // the metadata is too old to say, a leg that records the legs now in
        // sync as failed is taken for one.
        let inSyncNow = legs.snapshot.readable.map { legs.member($0.index).uuid }
        let usedAlone = found.movedOn(sinceFailedIn: member.failedGeneration)
            ?? inSyncNow.contains { found.record(of: $0)?.state == .degraded }
        guard !usedAlone else { throw .usedAlone(leg: device.name) }
        if found.servedRaw {
            logger.warning("leg \(index) (\(device.name)) was served on its own, writable: it gets a full copy")
            return true
        }
        // Older than the last clearing of bits (an old copy put back): the
        // bitmap no longer says everything it misses.
        if found.events < metadata.lastClearing {
            logger.warning("leg \(index) (\(device.name)) is older than the bitmap (its event \(found.events), bits cleared at event \(metadata.lastClearing)): it may be an old copy; it gets a full copy")
            return true
        }
        return false
    }

    /// Opens a degraded leg's device again. Its old file closes once the
    /// last request on it has ended: until then a block device refuses a
    /// second claim (EBUSY), for a moment.
    private func reopen(_ name: String) throws(MirrorError) -> BlockDevice {
        let deadline = ContinuousClock.now + .seconds(2)
        while true {
            do {
                return try Mirror.openLeg(name, options: deviceOptions, logger: logger)
            } catch {
                guard case .busy(_, let holder) = error else { throw .open(error) }
                guard ContinuousClock.now < deadline else {
                    // Held by this server: a request on the old file has not ended.
                    guard holder?.contains("pid \(getpid()) ") != true else {
                        throw .invalidLegChange("\(name) still has requests from before it failed; try again in a while")
                    }
                    throw .open(error)
                }
                pause(for: .milliseconds(50))
            }
        }
    }

    /// Puts the device at `spec` in place of leg `index`; it gets a full
    /// copy. A leg in sync stays in service (read and written) until the
    /// copy ends, then leaves the mirror (md's --replace); any other is
    /// replaced at once. A device that holds mirror metadata (of this mirror
    /// or another) is refused: it may be a leg that someone still needs. So
    /// is one that holds a file system or a partition table, unless `force`.
    public func replaceLeg(_ index: Int, with spec: String, force: Bool = false) throws(MirrorError) {
        try changingLegs(index)
        defer { maintenance.unlock() }
        let healthy = legs.member(index).state == .inSync
        if healthy && legs.count == Superblock.maxLegs {
            throw .invalidLegChange("the mirror has \(Superblock.maxLegs) legs, the most it can have, and leg \(index) "
                                    + "is in sync: a replacement needs a place beside it while it is copied to "
                                    + "(remove-leg another leg first, or fail-leg \(index) to replace it at once)")
        }
        if !healthy { try checkNotLastAnswering(index) }
        let device = try openNewLeg(spec, force: force)
        try bringIn(healthy ? .added(replacing: index) : .at(index), device: device, uuid: .random(), fullCopy: true)
    }

    /// Adds the device at `spec` as a new leg (the mirror grows by one, up to
    /// 64); it gets a full copy, and is read only once it holds everything.
    /// Refused as `replaceLeg` refuses a device. Returns its index.
    @discardableResult
    public func addLeg(_ spec: String, force: Bool = false) throws(MirrorError) -> Int {
        try changingLegs(nil)
        defer { maintenance.unlock() }
        let device = try openNewLeg(spec, force: force)
        return try bringIn(.added(replacing: nil), device: device, uuid: .random(), fullCopy: true)
    }

    /// Takes leg `index` out of the mirror for good: the legs after it move
    /// down one, the others' superblocks stop listing it, then its own says
    /// it was removed, so that it is never served as one of the mirror's
    /// legs again. Refused for the last leg in sync, below two legs, and
    /// below --min-in-sync-legs.
    public func removeLeg(_ index: Int) throws(MirrorError) {
        try changingLegs(index)
        defer { maintenance.unlock() }
        try checkNotLastAnswering(index)
        let removed = try legs.remove(index, keepingInSync: redundancy.policy.minInSync)
        guard superblocks.commitAndWait() else { throw .metadataIO(leg: "every leg", errno: EIO) }
        retire(removed, why: "removed")
        let now = legs.all.map(\.name).joined(separator: " ")
        logger.info("leg \(index) (\(removed.name)) removed from the mirror; its legs now: \(now)")
    }

    /// Opens a device to become a leg: as large as the legs, holding no
    /// mirror's metadata, and nothing libblkid knows unless `force`.
    private func openNewLeg(_ spec: String, force: Bool) throws(MirrorError) -> BlockDevice {
        let device: BlockDevice
        do { device = try Mirror.openLeg(spec, options: deviceOptions, logger: logger) } catch { throw .open(error) }
        guard device.size >= layout.legBytes else {
            throw .sizeChanged(leg: device.name, bytes: device.size, expected: layout.legBytes)
        }
        if let found = try Mirror.readSuperblock(of: device, client: client) {
            let what = found.removed ? "a leg removed from it" : "leg \(found.legIndex)"
            throw .invalidLegChange("\(device.name) holds the metadata of mirror \(found.mirror) (\(what)); a new leg "
                                    + "must be a device no mirror uses (`dmio-nbd wipe` frees one no longer wanted)")
        }
        try Mirror.checkNothingIsLost(on: device, client: client, force: force, logger: logger)
        return device
    }

    /// Writes, on a leg that has left the mirror, a superblock that says so
    /// (in both slots), listing the legs as they are now: a leg whose
    /// superblock could not be written still lists itself with a UUID the
    /// mirror no longer has, and is refused for that.
    private func retire(_ member: LegTable.Member, why: String) {
        guard let device = member.device else { return }
        metadata.pagesBehind.forget(device)
        // Its own entry after the legs the mirror has now: a reader that
        // knew nothing of the removed flag finds no place for it either.
        let now = legs.recorded
        let own = LegRecord(uuid: member.uuid, state: .degraded, cause: .operator, errno: 0, name: member.name)
        var superblock = Superblock(mirror: uuid, legIndex: now.legs.count, events: metadata.eventCount,
                                    generation: now.generation, clean: true, layout: layout, legs: now.legs + [own])
        superblock.removed = true
        let slot = superblock.encoded()
        do {
            try MetadataStore.writeBytes(slot + slot, offset: 0, to: [device], client: client)
        } catch {
            logger.warning("\(member.name) left the mirror (\(why)) but its superblock could not say so: \(error)")
        }
    }

    /// Makes `device` a leg, placed as `placement` says, with `maintenance` held.
    @discardableResult
    private func bringIn(_ placement: LegTable.Placement, device: BlockDevice, uuid: MirrorUUID,
                         fullCopy: Bool) throws(MirrorError) -> Int {
        // Clients were told the block size when they connected.
        guard device.blockSize <= blockSizes.minimum else {
            throw .invalidLegChange("\(device.name) needs I/O aligned to \(device.blockSize) bytes; "
                                    + "the mirror's clients were told \(blockSizes.minimum)")
        }
        if fullCopy {
            bitmap.markAll()
            // No superblock older than this mirror's may outrank its own.
            try MetadataStore.writeBytes([UInt8](repeating: 0, count: 2 * MirrorLayout.slotBytes), offset: 0,
                                         to: [device], client: client)
        }
        // The leg's bitmap may be old: it gets the whole bitmap before it is
        // written (after any page still on its way to it from before).
        metadata.pagesBehind.waitUntilLanded(device)
        try MetadataStore.writeBytes(bitmap.image(bitmapBytes: layout.bitmapBytes), offset: MirrorLayout.bitmapOffset,
                                     to: [device], client: client)
        metadata.pagesBehind.landedWhole(on: device)
        let index = try legs.bringIn(placement, device: device, uuid: uuid)
        guard bitmapCommit.commitAndWait(), superblocks.commitAndWait() else {
            throw .metadataIO(leg: "every leg", errno: EIO)
        }
        let how = switch placement {
        case .at: fullCopy ? "replaced: full copy" : "re-added: copying the regions written meanwhile"
        case .added(let replacing?): "added to replace leg \(replacing), which serves until this one has a full copy"
        case .added(nil): "added: full copy"
        }
        logger.info("leg \(index) (\(device.name)) \(how)")
        wake()
        return index
    }

    /// Refuses to take out leg `index` while it is the last leg in sync that
    /// writes are answered from and writes are still on their way to the
    /// write-mostly legs: it alone holds them until they land.
    private func checkNotLastAnswering(_ index: Int) throws(MirrorError) {
        let snapshot = legs.snapshot
        let answering = snapshot.readFirstLegs
        guard writeBehind.outstandingCount > 0, !snapshot.writeMostly.isEmpty,
              answering.count == 1, answering.first?.index == index else { return }
        throw .invalidLegChange("leg \(index) is the last leg in sync that is not write-mostly, and "
                                + "\(writeBehind.outstandingCount) writes it holds are still on their way to the "
                                + "write-mostly legs; try again once they land")
    }

    /// Takes `maintenance` for an operator's change of the legs (refused
    /// once the mirror stops), and checks `index` under it: the legs move when a replacement ends or a leg is
    /// removed, which holds it too. The caller unlocks it.
    private func changingLegs(_ index: Int?) throws(MirrorError) {
        maintenance.lock()
        // The stop writes the metadata clean: no leg changes after it; nor
        // while another server may own the legs.
        if lock.withLock({ stopping }) || lease?.isValid == false {
            maintenance.unlock()
            throw .invalidLegChange(lease?.isValid == false ? "this server's lease on the legs has lapsed; try again"
                                                            : "the server is stopping")
        }
        if let index, !(0..<legs.count).contains(index) {
            maintenance.unlock()
            throw .noSuchLeg(index, legCount: legs.count)
        }
    }
}
