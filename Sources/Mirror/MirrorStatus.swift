import DMIO

/// What `dmio-nbd status` shows: the mirror, each leg, the resync.
public struct MirrorStatus: Sendable, Codable, Hashable {
    public struct Leg: Sendable, Codable, Hashable {
        public var index: Int
        public var device: String
        /// "file", "block device" or "NBD export"; nil while it cannot be opened.
        public var kind: String?
        public var state: LegState
        /// What failed the leg (e.g. "No space left on device (ENOSPC)"), if
        /// anything; for a leg in sync, the last error it returned.
        public var error: String?
        /// Why a degraded leg is out; nil when not recorded (or in use).
        public var cause: LegCause?
        /// The errno of `error`, by name ("ENOSPC").
        public var errno: String?
        public var readErrors: Int
        public var writeErrors: Int
        /// Bytes the leg lacks (at least: a leg that needs a full copy when
        /// it comes back lacks more): the regions a resync has yet to copy
        /// to it, or those written while it was out. Nil in the answer of a
        /// server older than this field, as the other new fields.
        public var outOfSyncBytes: UInt64?
        /// A rebuilding leg copied to in place of leg `replaces`, which
        /// stays in service until this one is in sync (replace-leg of a
        /// leg in sync).
        public var replaces: Int?
        /// Read only when no other leg in sync can be; written behind with
        /// --write-behind. Nil (not) in an older server's answer.
        public var writeMostly: Bool?
        /// Writes answered before this write-mostly leg had them, still
        /// outstanding to it.
        public var writesBehind: Int?

        /// What the metrics and the events call the leg's state.
        public var condition: LegCondition { LegCondition(state: state, cause: cause, opened: kind != nil) }

        /// "write: ENOSPC", "operator", "open: EROFS": why a degraded leg is out.
        public var why: String? {
            guard state == .degraded, let cause else { return nil }
            return [cause.word, errno].compactMap { $0 }.joined(separator: ": ")
        }
    }

    public struct Resync: Sendable, Codable, Hashable {
        public var active: Bool
        public var reason: String
        public var regionsDone: Int
        public var regionsTotal: Int
        public var bytesCopied: UInt64
        public var bytesPerSecond: Double
        /// Seconds until the copy ends at the current speed.
        public var etaSeconds: Double?
        /// How the last pass ended.
        public var lastResult: String
        /// --resync-rate, in bytes a second; 0 when unlimited.
        public var rateLimit: UInt64?

        /// "40% (820/2048 regions, 410 MiB), 210 MiB/s, ETA 6 s"
        public var summary: String {
            passSummary(regionsDone: regionsDone, regionsTotal: regionsTotal, bytes: bytesCopied,
                        bytesPerSecond: bytesPerSecond, etaSeconds: etaSeconds)
        }
    }

    /// A check or a repair (`dmio-nbd check`, `dmio-nbd repair`): under way,
    /// or the last one since the server started.
    public struct Scrub: Sendable, Codable, Hashable {
        /// "check" or "repair".
        public var action: String
        /// Also while asked for and about to start.
        public var active: Bool
        public var regionsDone: Int
        public var regionsTotal: Int
        /// Bytes of the mirror compared so far (each leg's copy of them read).
        public var bytesChecked: UInt64
        public var bytesPerSecond: Double
        public var etaSeconds: Double?
        /// Regions whose copies differed when read twice (md's mismatch_cnt, in regions).
        public var mismatchedRegions: Int
        /// Bytes at which they differed.
        public var mismatchedBytes: UInt64
        /// Of those, the regions rewritten from the winning copy (a repair).
        public var repairedRegions: Int
        /// Of those, the regions where three or more legs had no majority:
        /// reported, never rewritten.
        public var unresolvedRegions: Int
        /// Copies a leg could not read (a leg's region each), rewritten from
        /// another leg.
        public var readErrorsRepaired: Int
        /// Copies a leg could not read and that were not rewritten (no copy
        /// all the others agree on, or the write failed: the leg is then out).
        public var readErrorsLeft: Int?
        /// Regions no leg could read.
        public var unreadableRegions: Int
        /// How the last one ended, with what it found.
        public var lastResult: String
        /// How it ended: "done" when it went through every region, "stopped"
        /// (cancelled, the server stopping, a resync due), or why it could not
        /// go on; nil while under way.
        public var result: String?

        /// Whether it went through every region and left no copy that differs
        /// (a repair: none it could not rewrite) and nothing unreadable.
        public var isClean: Bool {
            let unrepaired = action == ScrubAction.repair.rawValue ? mismatchedRegions - repairedRegions : mismatchedRegions
            return result == "done" && unrepaired == 0 && unreadableRegions == 0 && (readErrorsLeft ?? 0) == 0
        }

        public var summary: String {
            "\(action): " + passSummary(regionsDone: regionsDone, regionsTotal: regionsTotal, bytes: bytesChecked,
                                        bytesPerSecond: bytesPerSecond, etaSeconds: etaSeconds)
                + "; \(mismatchedRegions) regions differ"
        }
    }

    public var uuid: String
    public var size: UInt64
    public var regionBytes: UInt32
    public var regions: Int
    public var dirtyRegions: Int
    /// Regions that every writable leg holds (the dmsetup in-sync count).
    public var inSyncRegions: Int
    public var events: UInt64
    /// Bitmap writes since the start (each a commit of marked regions).
    public var bitmapWrites: UInt64?
    /// `--read-policy`: "balanced" or "first".
    public var readPolicy: String?
    public var legs: [Leg]
    public var resync: Resync
    /// nil until a check or repair is asked for.
    public var scrub: Scrub?

    /// "2 of 2 legs in sync", with a resync's progress: one line for a
    /// service manager's status.
    public var summaryLine: String {
        let inSync = legs.filter { $0.state == .inSync }.count
        var line = "mirror \(uuid): \(inSync) of \(legs.count) legs in sync"
        if resync.active { line += ", resyncing \(resync.summary)" }
        if let scrub, scrub.active { line += ", \(scrub.summary)" }
        return line
    }

    /// One line in the style of dm-raid1's `dmsetup status`:
    /// `<legs> <device>... <in-sync>/<regions> 1 <health>`, where health has
    /// one letter a leg: A alive, D failed a write, R failed a read, and
    /// rebuilding legs count as alive while the in-sync count trails.
    public var dmsetupLine: String {
        let health = legs.map { leg -> String in
            switch leg.state {
            case .inSync, .rebuilding: "A"
            case .degraded: leg.writeErrors == 0 && leg.readErrors > 0 ? "R" : "D"
            }
        }.joined()
        return "\(legs.count) " + legs.map(\.device).joined(separator: " ")
            + " \(inSyncRegions)/\(regions) 1 \(health)"
    }
}

/// A leg's state as the metrics (`dmio_leg_state`) and the events name it:
/// `missing` is a degraded leg that could not be opened.
public enum LegCondition: String, CaseIterable, Sendable {
    case inSync = "in_sync", degraded, rebuilding, missing, behind

    init(state: LegState, cause: LegCause?, opened: Bool) {
        switch state {
        case .inSync: self = .inSync
        case .rebuilding: self = .rebuilding
        case .degraded: self = cause == .open || !opened ? .missing : cause == .behind ? .behind : .degraded
        }
    }
}

extension Mirror {
    /// What each leg's bios did (by index), for legs opened with
    /// `DeviceOptions.countsRequests`; nil for the others.
    public var legStatistics: [RequestStatistics?] { legs.all.map { $0.device?.statistics } }

    public var status: MirrorStatus {
        let members = legs.all
        let progress = pass.current
        let dirty = bitmap.dirtyCount
        let allInSync = members.allSatisfy { $0.state == .inSync }
        let left = progress.regionsTotal - progress.regionsDone
        let regionBytes = UInt64(layout.regionBytes)
        func outOfSync(_ state: LegState) -> UInt64 {
            switch state {
            case .inSync: 0
            case .rebuilding where progress.active: min(layout.dataBytes, UInt64(left) * regionBytes)
            case .rebuilding, .degraded: min(layout.dataBytes, UInt64(dirty) * regionBytes)
            }
        }
        return MirrorStatus(
            uuid: "\(uuid)", size: layout.dataBytes, regionBytes: layout.regionBytes, regions: layout.regionCount,
            dirtyRegions: dirty,
            inSyncRegions: allInSync && !progress.active ? layout.regionCount : layout.regionCount - (progress.active ? left : dirty),
            events: metadata.eventCount, bitmapWrites: metadata.bitmapWrites, readPolicy: readPolicy.rawValue,
            legs: members.enumerated().map { index, member in
                MirrorStatus.Leg(index: index, device: member.name, kind: member.device.map { "\($0.kind)" },
                                 state: member.state,
                                 error: member.errno == 0 ? nil : errnoDescription(member.errno),
                                 cause: member.state == .degraded && member.cause != .unknown ? member.cause : nil,
                                 errno: member.errno == 0 ? nil : errnoName(member.errno),
                                 readErrors: member.readErrors, writeErrors: member.writeErrors,
                                 outOfSyncBytes: outOfSync(member.state), replaces: member.replaces,
                                 writeMostly: member.writeMostly,
                                 writesBehind: member.device.map(writeBehind.backlog(of:)) ?? 0)
            },
            resync: MirrorStatus.Resync(progress, rateLimit: pass.rateLimit),
            scrub: MirrorStatus.Scrub(pass.currentScrub, asked: isScrubAsked))
    }
}

/// "40% (820/2048 regions, 410 MiB), 210 MiB/s, ETA 6 s"
private func passSummary(regionsDone: Int, regionsTotal: Int, bytes: UInt64, bytesPerSecond: Double,
                         etaSeconds: Double?) -> String {
    let percent = regionsTotal > 0 ? regionsDone * 100 / regionsTotal : 100
    let eta = etaSeconds.map { ", ETA \(Int($0.rounded(.up))) s" } ?? ""
    return "\(percent)% (\(regionsDone)/\(regionsTotal) regions, \(bytes >> 20) MiB), \(Int(bytesPerSecond) >> 20) MiB/s\(eta)"
}

extension MirrorStatus.Scrub {
    /// nil when no scrub ran or was asked for.
    init?(_ progress: RegionPass.Progress, asked: Bool) {
        guard asked || !progress.reason.isEmpty else { return nil }
        let findings = progress.findings
        self.init(action: progress.reason, active: progress.active || asked,
                  regionsDone: progress.regionsDone, regionsTotal: progress.regionsTotal,
                  bytesChecked: progress.bytesCopied, bytesPerSecond: progress.bytesPerSecond,
                  etaSeconds: progress.etaSeconds, mismatchedRegions: findings.mismatchedRegions,
                  mismatchedBytes: findings.mismatchedBytes, repairedRegions: findings.repairedRegions,
                  unresolvedRegions: findings.unresolvedRegions, readErrorsRepaired: findings.readErrorsRepaired,
                  readErrorsLeft: findings.readErrorsLeft,
                  unreadableRegions: findings.unreadableRegions, lastResult: progress.lastResult,
                  result: progress.active || asked ? nil : progress.outcome)
    }
}

extension MirrorStatus.Resync {
    init(_ progress: RegionPass.Progress, rateLimit: UInt64) {
        self.init(active: progress.active, reason: progress.reason, regionsDone: progress.regionsDone,
                  regionsTotal: progress.regionsTotal, bytesCopied: progress.bytesCopied,
                  bytesPerSecond: progress.bytesPerSecond, etaSeconds: progress.etaSeconds,
                  lastResult: progress.lastResult, rateLimit: rateLimit)
    }
}
