import BlockTargets
import DMIO
import Glibc
import Logging

/// Making a mirror (writing new metadata on its legs) and opening one
/// (checking that the legs belong together before anything is written).
extension Mirror {
    /// Writes the metadata of a new mirror on `devices`. When `fresh` (the
    /// legs are new, all zeroes) they start in sync; otherwise leg 0's data
    /// is the mirror's and the other legs get a full copy at the first start.
    /// Refuses legs of unequal size, and unless `force` legs that already
    /// belong to a mirror or hold something else (a file system, a
    /// partition table).
    @discardableResult
    public static func create(_ devices: [BlockDevice], client: DMIOClient,
                              regionBytes: UInt32 = MirrorLayout.defaultRegionBytes,
                              fresh: Bool, force: Bool = false, writeMostly: Set<Int> = [],
                              logger: Logger = Logger(label: "dmio.mirror")) throws(MirrorError) -> MirrorUUID {
        try checkCount(devices.count)
        try checkWriteMostly(writeMostly, legCount: devices.count)
        let sizes = Set(devices.map(\.size))
        guard sizes.count == 1, let legBytes = sizes.first else {
            throw .unequalSizes(Dictionary(devices.map { ($0.name, $0.size) }, uniquingKeysWith: { first, _ in first }))
        }
        // The mirrors the legs belong to stay locked until their metadata is
        // gone: none of them may start meanwhile.
        var overwritten: [MirrorUUID: MirrorLock] = [:]
        defer { overwritten.values.forEach { $0.release() } }
        for device in devices {
            // With force, damaged metadata is there to be overwritten.
            let existing = force ? (try? readSuperblock(of: device, client: client)) ?? nil
                                 : try readSuperblock(of: device, client: client)
            if let existing {
                if overwritten[existing.mirror] == nil { overwritten[existing.mirror] = try MirrorLock(existing.mirror) }
                if !force { throw .alreadyAMirror(leg: device.name, mirror: existing.mirror) }
            } else {
                try checkNothingIsLost(on: device, client: client, force: force, logger: logger)
            }
        }
        let layout = try MirrorLayout(legBytes: legBytes, regionBytes: regionBytes)
        let uuid = MirrorUUID.random()
        let generation = Superblock.newGeneration()
        let records = devices.indices.map { index in
            LegRecord(uuid: .random(), state: fresh || index == 0 ? .inSync : .rebuilding, errno: 0,
                      name: devices[index].name, writeMostly: writeMostly.contains(index))
        }
        let bitmap = RegionBitmap(regionCount: layout.regionCount)
        if !fresh { bitmap.markAll() }
        try MetadataStore.writeBytes(bitmap.image(bitmapBytes: layout.bitmapBytes), offset: MirrorLayout.bitmapOffset,
                                     to: devices, client: client)
        for (index, device) in devices.enumerated() {
            let superblock = Superblock(mirror: uuid, legIndex: index, events: 1, generation: generation, clean: true,
                                        layout: layout, legs: records)
            // Event 1 goes in slot 1, where the store keeps odd events, so
            // that event 2 (the first start) does not overwrite it: a torn
            // write there leaves this one. Slot 0 is emptied: an older
            // mirror's superblock must not outrank this one.
            try MetadataStore.writeBytes([UInt8](repeating: 0, count: MirrorLayout.slotBytes) + superblock.encoded(),
                                         offset: 0, to: [device], client: client)
        }
        return uuid
    }

    /// Refuses write-mostly legs the mirror does not have.
    static func checkWriteMostly(_ writeMostly: Set<Int>, legCount: Int) throws(MirrorError) {
        if let index = writeMostly.sorted().first(where: { !(0..<legCount).contains($0) }) {
            throw .noSuchLeg(index, legCount: legCount)
        }
    }

    /// Refuses a device that holds a file system, a partition table, an
    /// LVM or md member (what libblkid finds), naming it, unless `force`.
    static func checkNothingIsLost(on device: BlockDevice, client: DMIOClient, force: Bool,
                                   logger: Logger) throws(MirrorError) {
        let found: [DeviceSignature]
        do { found = try device.signatures(client: client) } catch { throw .open(error) }
        guard !found.isEmpty else { return }
        let what = found.map(\.description)
        guard force else { throw .holdsData(leg: device.name, what: what) }
        logger.warning("\(device.name): overwriting \(what.joined(separator: " and ")) (--force)")
    }

    /// Opens the mirror whose legs are `specs` (paths or NBD URIs), given in
    /// their order. A leg that cannot be opened or read (a dead disk, an
    /// unreachable server) is served as degraded when the other legs record
    /// it as degraded already. When they record it in sync it may hold newer
    /// data than they do (it may have served alone since they last heard of
    /// it), so the mirror starts without it only if `allowMissingLegs`. So
    /// does a leg whose metadata is missing or damaged (it is not touched;
    /// it needs a replacement). A leg of another mirror is refused. Nothing
    /// is written until `start()`. A remote leg that goes away is tried
    /// again `reconnectAfter` after (then less often) and re-added once it
    /// answers as the same leg; nil leaves that to an operator.
    public static func open(_ specs: [String], client: DMIOClient, rateLimit: UInt64 = 0,
                            readPolicy: ReadPolicy = .balanced, redundancy: RedundancyPolicy = .default,
                            reconnectAfter: Duration? = nil, ownership: Ownership = .none,
                            writeBehind: WriteBehindPolicy = .default, writeMostly: Set<Int> = [],
                            deviceOptions: DeviceOptions = DeviceOptions(), allowMissingLegs: Bool = false,
                            eventSink: (any EventSink)? = nil,
                            logger: Logger = Logger(label: "dmio.mirror")) throws(MirrorError) -> Mirror {
        try checkCount(specs.count)
        try checkWriteMostly(writeMostly, legCount: specs.count)
        guard (1...specs.count).contains(redundancy.minInSync) else {
            throw .invalidMinInSync(redundancy.minInSync, legCount: specs.count)
        }
        var found: [Int: (device: BlockDevice, superblock: Superblock)] = [:]
        var unavailable: [Int: Int32] = [:]
        /// Legs with no usable metadata (none, or both copies damaged).
        var unusable: [Int: MirrorError] = [:]
        for (index, spec) in specs.enumerated() {
            // A remote leg may take its time (up to the remote timeout): say so first.
            if DeviceSpec.isURI(spec) { logger.info("leg \(index): connecting to \(spec)") }
            let device: BlockDevice
            do {
                device = try openLeg(spec, options: deviceOptions, logger: logger)
                let connections = device.connectionCount.map { ", \($0) connection\($0 == 1 ? "" : "s")" } ?? ""
                logger.info("leg \(index): \(spec) opened (\(device.kind)\(connections), \(device.size >> 20) MiB)")
            } catch {
                logger.error("leg \(index): \(error)")
                switch error {
                case .openFailed(_, let errno): unavailable[index] = errno
                case .busy: unavailable[index] = EBUSY
                default: unavailable[index] = EIO
                }
                continue
            }
            do throws(MirrorError) {
                guard let superblock = try readSuperblock(of: device, client: client) else {
                    throw MirrorError.notAMirror(leg: device.name)
                }
                found[index] = (device, superblock)
            } catch {
                switch error {
                case .metadataIO(_, let errno):
                    logger.error("leg \(index) (\(spec)): cannot read its metadata: \(errnoDescription(errno))")
                    unavailable[index] = errno
                case .notAMirror, .corruptLeg:
                    unusable[index] = error
                default:
                    throw error
                }
            }
        }
        // The mirror most legs belong to (the freshest among equals): a
        // foreign leg is then the odd one out, whatever its event count. A
        // leg removed from its mirror is none of its legs.
        let mirrors = Dictionary(grouping: found.values.map(\.superblock).filter { !$0.removed }, by: \.mirror).values
            .map { superblocks in (legs: superblocks.count, newest: superblocks.max(by: Superblock.isLessCurrent)!) }
        let freshest = mirrors.max(by: { ($0.legs, $0.newest.events) < ($1.legs, $1.newest.events) })?.newest
        if let (_, (device, removed)) = found.sorted(by: { $0.key < $1.key }).first(where: { $0.value.superblock.removed }) {
            // The legs it left recorded, or those the others record now.
            let now = (freshest?.mirror == removed.mirror ? freshest?.legs : nil) ?? Array(removed.legs.prefix(removed.legIndex))
            throw .removedLeg(leg: device.name, mirror: removed.mirror, legsNow: now.map(\.name))
        }
        guard let freshest else {
            if let (_, error) = unusable.min(by: { $0.key < $1.key }) { throw error }
            throw .noLegAvailable(specs)
        }
        // A leg without usable metadata is left out like one that cannot be
        // opened (and is not touched): it needs a replacement.
        for (index, error) in unusable {
            logger.error("leg \(index): \(error)")
            unavailable[index] = EIO
        }
        let legs = found.sorted { $0.key < $1.key }
        // Legs of two mirrors: say so before anything else about them.
        for (_, (device, superblock)) in legs where superblock.mirror != freshest.mirror {
            throw .foreignLeg(leg: device.name, belongsTo: superblock.mirror, expected: freshest.mirror)
        }
        let exclusive = try MirrorLock(freshest.mirror)
        let takenOver: TakenOver?
        do {
            takenOver = try checkOwner(of: Array(found.values), freshest: freshest, ownership: ownership, client: client,
                                       logger: logger)
        } catch {
            exclusive.release()
            throw error
        }
        // Two legs that each record the other as failed, and were each written
        // after the other failed them, were each used alone: their data
        // diverged, and no event count can say which to keep. (One that
        // recorded the other's failure and was then failed itself is only
        // behind: the other's generation moved on, its own did not.)
        // Legs are known by their UUIDs: one whose superblock was not written
        // when the legs moved (it was out) has them at other places.
        for (first, a) in legs {
            for (second, b) in legs where first < second {
                guard let aRecordsB = a.superblock.record(of: b.superblock.own.uuid),
                      let bRecordsA = b.superblock.record(of: a.superblock.own.uuid),
                      aRecordsB.state == .degraded && bRecordsA.state == .degraded else { continue }
                let bMovedOn = b.superblock.movedOn(sinceFailedIn: aRecordsB.failedGeneration)
                let aMovedOn = a.superblock.movedOn(sinceFailedIn: bRecordsA.failedGeneration)
                // Metadata too old to tell: each was used alone, as far as anyone knows.
                if bMovedOn ?? true && aMovedOn ?? true { throw .diverged(a.device.name, b.device.name) }
            }
        }
        // The freshest superblock says what the legs are; a leg's own may be
        // older (it was out, or a crash came between the legs' writes) and
        // have the legs at other places, or fewer or more of them.
        guard freshest.legs.count == specs.count else {
            throw .wrongLegCount(mirror: freshest.mirror, has: freshest.legs.count, given: specs.count,
                                 legsNow: freshest.legs.map(\.name))
        }
        for (index, (device, superblock)) in legs {
            let own = superblock.own.uuid
            guard own == freshest.legs[index].uuid else {
                if let place = freshest.legs.firstIndex(where: { $0.uuid == own }) {
                    throw .wrongPosition(leg: device.name, isLeg: place, givenAs: index)
                }
                throw .replacedLeg(leg: device.name, index: index, mirror: freshest.mirror,
                                   now: freshest.legs[index].name)
            }
            guard device.size >= freshest.legBytes else {
                throw .sizeChanged(leg: device.name, bytes: device.size, expected: freshest.legBytes)
            }
        }
        let layout = try MirrorLayout(validating: freshest)
        // A leg whose superblock is older than the freshest, which records it
        // as in use, missed changes the others have: it is an old copy put
        // back (a restored backup or snapshot), or a crash fell between the
        // legs' superblock writes. It may hold older data anywhere, and no
        // bitmap says where: it is rebuilt in full from the legs in sync.
        // So is a leg served on its own, writable (its data may differ anywhere).
        var stale = Set(legs.filter { index, leg in
            (leg.superblock.events < freshest.events || leg.superblock.servedRaw) && freshest.legs[index].state != .degraded
        }.map(\.key))
        // Never the last copy: when no in-sync leg is up to date (a crash
        // between writes that reached only a rebuilding leg), the newest
        // in-sync one stays in sync and the others are copied from it.
        let recordedInSync = legs.filter { index, _ in freshest.legs[index].state == .inSync }
        if recordedInSync.allSatisfy({ stale.contains($0.key) }),
           let newest = recordedInSync.max(by: { Superblock.isLessCurrent($0.value.superblock, $1.value.superblock) }) {
            stale.remove(newest.key)
        }
        // A write-mostly leg may lack writes answered before a crash (they
        // were on their way to it): when the only legs in sync that are up
        // to date are write-mostly, the crash fell between the legs' writes
        // of the last commit, and the newest other leg in sync, one commit
        // behind, holds those writes: it stays in sync, and they are copied.
        let upToDate = recordedInSync.map(\.key).filter { !stale.contains($0) }
        if !freshest.clean, !upToDate.isEmpty, upToDate.allSatisfy({ freshest.legs[$0].writeMostly }),
           let newest = recordedInSync.filter({ !freshest.legs[$0.key].writeMostly && !$0.value.superblock.servedRaw })
               .max(by: { Superblock.isLessCurrent($0.value.superblock, $1.value.superblock) }),
           newest.value.superblock.events + 1 == freshest.events {
            let line = "leg \(newest.key) (\(specs[newest.key])) missed the last superblock write of a crash, and the "
                + "legs that have it are write-mostly: it stays the source, and they get a full copy from it"
            logger.warning("\(line)")
            stale.remove(newest.key)
            stale.formUnion(upToDate)
        }
        for index in stale.sorted() {
            let superblock = found[index]!.superblock
            if superblock.servedRaw {
                logger.warning("leg \(index) (\(specs[index])) was served on its own, writable: it gets a full copy from the legs in sync")
            } else {
                logger.warning("leg \(index) (\(specs[index])) is older than the others (event \(superblock.events), theirs \(freshest.events)): it may be an old copy; it gets a full copy from the legs in sync")
            }
        }
        func recorded(_ index: Int) -> LegTable.Member {
            let record = freshest.legs[index]
            guard let device = found[index]?.device else {
                guard record.state == .degraded else {
                    // Its generation is not known (a crash may have come between
                    // the legs' superblock writes): re-adding it judges it the old way.
                    return LegTable.Member(name: specs[index], device: nil, uuid: record.uuid, state: .degraded,
                                           errno: unavailable[index] ?? EIO,
                                           cause: unusable[index] == nil ? .open : .metadata)
                }
                return LegTable.Member(name: specs[index], device: nil, uuid: record.uuid, state: .degraded,
                                       errno: record.errno, cause: record.cause, failedGeneration: record.failedGeneration)
            }
            let state = stale.contains(index) ? .rebuilding : record.state
            return LegTable.Member(name: specs[index], device: device, uuid: record.uuid, state: state, errno: record.errno,
                                   cause: record.cause, failedGeneration: record.failedGeneration,
                                   replaces: state == .rebuilding ? record.replaces : nil)
        }
        let members = specs.indices.map { index in
            var member = recorded(index)
            member.writeMostly = freshest.legs[index].writeMostly || writeMostly.contains(index)
            return member
        }
        guard members.contains(where: { $0.state == .inSync }) else {
            throw .noLegAvailable(specs.indices.filter { freshest.legs[$0].state == .inSync }.map { specs[$0] })
        }
        let missingInUse = unavailable.keys.sorted().filter { freshest.legs[$0].state != .degraded }
        if !missingInUse.isEmpty && !allowMissingLegs {
            if let index = missingInUse.first(where: { unusable[$0] != nil }) {
                throw .unusableLeg(leg: specs[index], index: index, mirror: freshest.mirror, reason: "\(unusable[index]!)")
            }
            throw .missingLegs(missingInUse.map { specs[$0] })
        }
        for index in missingInUse {
            logger.warning("leg \(index) (\(specs[index])) is unavailable: serving without it (degraded)")
        }
        // Each leg not degraded has a copy of the bitmap; a crash between
        // their writes leaves them different, and every bit set anywhere counts.
        var bitmap = [UInt8](repeating: 0, count: Int(layout.bitmapBytes))
        for member in members where member.state != .degraded {
            let bytes = try MetadataStore.readBytes(member.device!, offset: MirrorLayout.bitmapOffset,
                                                    count: bitmap.count, client: client)
            for index in bitmap.indices { bitmap[index] |= bytes[index] }
        }
        // A write-mostly leg's bitmap goes behind the others' (write-behind):
        // after a crash, the bitmaps here say every region the legs may
        // differ in only with a leg in sync whose bitmap did not go behind
        // (a rebuilding leg's may lack the bits of commits made while it was
        // brought in), and only when no such leg is missing (one degraded
        // since the freshest superblock took bits the others here lack).
        let anyBehind = members.indices.contains { members[$0].state != .degraded && freshest.legs[$0].bitmapBehind }
        let trusted = members.indices.contains { members[$0].state == .inSync && !freshest.legs[$0].bitmapBehind }
        let trustedMissing = missingInUse.contains { !freshest.legs[$0].bitmapBehind }
        let bitmapsBehind = !freshest.clean && anyBehind && (!trusted || trustedMissing)
        if bitmapsBehind {
            logger.warning("the legs here had their bitmaps written behind another leg's (write-mostly legs): every region counts as dirty (a resync, or a leg re-added, copies all of it)")
        }
        if !stale.isEmpty || bitmapsBehind { bitmap = [UInt8](repeating: 0xFF, count: bitmap.count) }
        let inSync = members.filter { $0.state == .inSync }.count
        if !freshest.clean { logger.warning("mirror \(freshest.mirror) was not stopped cleanly: its dirty regions will be resynced") }
        // Legs that leave the mirror here start a new generation, as a failure does.
        let generation = freshest.generation == 0 || !missingInUse.isEmpty ? Superblock.newGeneration()
                                                                            : freshest.generation
        return Mirror(uuid: freshest.mirror, layout: layout, members: members, bitmap: bitmap,
                      events: freshest.events, eventsCleared: freshest.eventsCleared, generation: generation,
                      recoveryPending: !freshest.clean && inSync > 1, exclusive: exclusive,
                      client: client, deviceOptions: deviceOptions, rateLimit: rateLimit, readPolicy: readPolicy,
                      redundancy: redundancy, reconnectAfter: reconnectAfter, ownership: ownership, takenOver: takenOver,
                      writeBehind: writeBehind, eventSink: eventSink, logger: logger)
    }

    /// Refuses legs that a server on another machine holds: it renewed its
    /// lease while this one watched the legs for a lease and a fifth
    /// (their newest event moved), or, unless `takeover`, it did not (it
    /// may only be cut off, and could write again). A server of this
    /// machine is not watched: this one holds the mirror's lock, so that
    /// server is gone. Watching needs no clock shared with the other machine.
    /// Returns the server taken over from, for the start to check its claim.
    static func checkOwner(of found: [(device: BlockDevice, superblock: Superblock)], freshest: Superblock,
                           ownership: Ownership, client: DMIOClient, logger: Logger) throws(MirrorError) -> TakenOver? {
        // The same machine in the same boot: the mirror's lock, held now,
        // says that server is gone. A clone with the same machine id boots
        // with another boot id, and is watched.
        guard let holder = freshest.owner,
              !(holder.host == ownership.me?.host && holder.boot == ownership.me?.boot) else { return nil }
        let watch = holder.lease + holder.lease / 5
        logger.info("the legs were last held by the server on \(holder): watching them for \(watch) for a renewal of its lease")
        pause(for: watch)
        // Nothing read at the end of the watch tells nothing: refused as alive.
        let newest = found.compactMap { try? readSuperblock(of: $0.device, client: client) }
            .filter { $0.mirror == freshest.mirror }.map(\.events).max()
        guard newest == freshest.events else { throw .ownedElsewhere(owner: holder, alive: true, lease: holder.lease) }
        guard ownership.takeover else { throw .ownedElsewhere(owner: holder, alive: false, lease: watch) }
        logger.warning("taking the legs over from the server on \(holder): its lease was not renewed for \(watch) (--takeover)")
        return TakenOver(owner: holder, event: freshest.events)
    }

    /// Opens a leg's device, and logs what the open could not do as asked
    /// (a remote leg on fewer connections).
    public static func openLeg(_ spec: String, options: DeviceOptions, logger: Logger) throws(DMIOError) -> BlockDevice {
        let device = try BlockDevice.open(spec, options: options)
        if let warning = device.openWarning { logger.warning("leg \(spec): \(warning)") }
        return device
    }

    /// The mirror that `device` is a leg of, if any: a device served on its
    /// own must not be one (its metadata would be overwritten).
    public static func mirrorOwning(_ device: BlockDevice, client: DMIOClient) throws(MirrorError) -> MirrorUUID? {
        try readSuperblock(of: device, client: client)?.mirror
    }

    /// The newer valid superblock of `device`; nil if it has none; throws
    /// when both slots are damaged.
    static func readSuperblock(of device: BlockDevice, client: DMIOClient) throws(MirrorError) -> Superblock? {
        try newestSuperblock(in: MetadataStore.readSlots(device, client: client), of: device)
    }

    /// The newer valid superblock of `slots` (read from `device`); nil if
    /// they hold none; throws when both are damaged.
    static func newestSuperblock(in slots: [Superblock.Decoded], of device: BlockDevice) throws(MirrorError) -> Superblock? {
        var newest: Superblock?
        var damage: String?
        for slot in slots {
            switch slot {
            case .superblock(let superblock):
                if superblock.events > newest?.events ?? 0 { newest = superblock }
            case .corrupt(let reason):
                damage = reason
            case .none:
                break
            }
        }
        if let newest { return newest }
        if let damage { throw .corruptLeg(leg: device.name, reason: damage) }
        return nil
    }

    private static func checkCount(_ count: Int) throws(MirrorError) {
        guard count >= 2 else { throw .tooFewLegs(count) }
        guard count <= Superblock.maxLegs else { throw .tooManyLegs(count) }
    }
}
