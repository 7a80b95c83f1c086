import DMIO

/// What `dmio-nbd status` shows: the mirror, each leg, the resync.
public struct MirrorStatus: Sendable, Codable, Hashable {
    public struct Leg: Sendable, Codable, Hashable {
        public var index: Int
        public var device: String
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

        /// "40% (820/2048 regions, 410 MiB), 210 MiB/s, ETA 6 s"
        public var summary: String {
            let percent = regionsTotal > 0 ? regionsDone * 100 / regionsTotal : 100
            let eta = etaSeconds.map { ", ETA \(Int($0.rounded(.up))) s" } ?? ""
            return "\(percent)% (\(regionsDone)/\(regionsTotal) regions, \(bytesCopied >> 20) MiB), "
                + "\(Int(bytesPerSecond) >> 20) MiB/s\(eta)"
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
    public var legs: [Leg]
    public var resync: Resync

    /// "2 of 2 legs in sync", with a resync's progress: one line for a
    /// service manager's status.
    public var summaryLine: String {
        let inSync = legs.filter { $0.state == .inSync }.count
        var line = "mirror \(uuid): \(inSync) of \(legs.count) legs in sync"
        if resync.active { line += ", resyncing \(resync.summary)" }
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

extension Mirror {
    public var status: MirrorStatus {
        let members = legs.all
        let progress = pass.current
        let dirty = bitmap.dirtyCount
        let allInSync = members.allSatisfy { $0.state == .inSync }
        let left = progress.regionsTotal - progress.regionsDone
        return MirrorStatus(
            uuid: "\(uuid)", size: layout.dataBytes, regionBytes: layout.regionBytes, regions: layout.regionCount,
            dirtyRegions: dirty,
            inSyncRegions: allInSync && !progress.active ? layout.regionCount : layout.regionCount - (progress.active ? left : dirty),
            events: metadata.eventCount,
            legs: members.enumerated().map { index, member in
                MirrorStatus.Leg(index: index, device: member.name, state: member.state,
                                 error: member.errno == 0 ? nil : errnoDescription(member.errno),
                                 cause: member.state == .degraded && member.cause != .unknown ? member.cause : nil,
                                 errno: member.errno == 0 ? nil : errnoName(member.errno),
                                 readErrors: member.readErrors, writeErrors: member.writeErrors)
            },
            resync: MirrorStatus.Resync(progress))
    }
}

extension MirrorStatus.Resync {
    init(_ progress: RegionPass.Progress) {
        self.init(active: progress.active, reason: progress.reason, regionsDone: progress.regionsDone,
                  regionsTotal: progress.regionsTotal, bytesCopied: progress.bytesCopied,
                  bytesPerSecond: progress.bytesPerSecond, etaSeconds: progress.etaSeconds,
                  lastResult: progress.lastResult)
    }
}
