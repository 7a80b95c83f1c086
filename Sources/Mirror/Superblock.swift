/// A leg's state as the superblock records it.
public enum LegState: UInt32, Sendable, Hashable, CustomStringConvertible {
    /// Holds the mirror's data; read and written.
    case inSync = 0
    /// Failed: neither read nor written until re-added. Regions written
    /// meanwhile stay dirty, so that re-adding copies only those.
    case degraded = 1
    /// Being copied to: written, not read, until the copy ends.
    case rebuilding = 2

    public var description: String {
        switch self {
        case .inSync: "in sync"
        case .degraded: "degraded"
        case .rebuilding: "rebuilding"
        }
    }
}

/// In JSON a leg's state is a word ("inSync", "degraded", "rebuilding"); on
/// disk it is the raw number.
extension LegState: Codable {
    private static let words: [LegState: String] = [.inSync: "inSync", .degraded: "degraded", .rebuilding: "rebuilding"]

    public init(from decoder: Decoder) throws {
        let word = try decoder.singleValueContainer().decode(String.self)
        guard let state = Self.words.first(where: { $0.value == word })?.key else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "leg state \(word)"))
        }
        self = state
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(Self.words[self]!)
    }
}

/// Why a leg left the mirror, as the superblock records it with the errno.
/// In JSON a word ("operator", "open"...).
public enum LegCause: UInt32, Sendable, Hashable, CaseIterable {
    /// Not recorded (metadata from before causes were), or nothing failed.
    case unknown = 0
    /// `fail-leg`.
    case `operator` = 1
    /// It could not be opened, or its metadata read, at start.
    case open = 2
    case read = 3
    case write = 4
    /// It holds no usable metadata (none, or both slots damaged).
    case metadata = 5
    /// A write-mostly leg whose write-behind backlog filled, with
    /// `--on-congestion pull-ahead` (DRBD's "Ahead"): written no more until
    /// its backlog drains, then caught up by a resync of its dirty regions.
    case behind = 6

    public var word: String {
        switch self {
        case .unknown: "unknown"
        case .operator: "operator"
        case .open: "open"
        case .read: "read"
        case .write: "write"
        case .metadata: "metadata"
        case .behind: "behind"
        }
    }
}

extension LegCause: Codable {
    public init(from decoder: Decoder) throws {
        let word = try decoder.singleValueContainer().decode(String.self)
        guard let cause = LegCause.allCases.first(where: { $0.word == word }) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "leg cause \(word)"))
        }
        self = cause
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(word)
    }
}

/// One leg's entry in the superblock.
struct LegRecord: Sendable, Hashable {
    var uuid: MirrorUUID
    var state: LegState
    var cause: LegCause = .unknown
    /// What failed the leg (an errno), 0 if nothing did.
    var errno: Int32
    /// For a degraded leg, the generation it was failed in: the one its own
    /// superblock still carries unless a server wrote to it since. 0 when
    /// not known (metadata written before generations were recorded).
    var failedGeneration: UInt64 = 0
    /// The path or URI the leg was last served by, "" if not known: a hint
    /// for the person who gives an old command line.
    var name = ""
    /// For a leg being copied to in place of a leg in sync (replace-leg of a
    /// healthy leg, md's --replace), the index of that leg: once the copy
    /// ends, this leg takes its place and that one is removed.
    var replaces: Int?
    /// Written, but read only when no other leg in sync can be (md's
    /// write-mostly): a slow or remote leg, written behind the others'
    /// answers with `--write-behind`.
    var writeMostly = false
    /// This leg's bitmap is written behind the others' (a write-mostly leg
    /// with write-behind), so it may lack bits that the others have: it
    /// alone cannot say what a crash left to copy.
    var bitmapBehind = false
}

/// The superblock: one 4 KiB slot, little-endian, CRC32C in its last four
/// bytes. Two slots per leg are written in turn (the event count picks the
/// slot), so a torn write leaves the other slot, one event older, intact.
struct Superblock: Sendable, Hashable {
    static let magic: [UInt8] = Array("DMIOMIRR".utf8)
    /// 2 adds the generation, each leg's cause, failed generation and name,
    /// the event of the last bit clearing and the raw-use flag (later, in
    /// bits a version 2 reader ignores: the removed flag, the leg a
    /// replacement replaces, the owner, write-mostly); version 1
    /// (where they read as 0, not recorded) is read too, and written as 2.
    static let version: UInt32 = 2
    /// Written while a leg is write-mostly: a build that knows nothing of
    /// it (it reads 1 and 2) refuses the legs rather than take a leg that
    /// lacks writes answered before a crash for the source of a recovery.
    static let writeMostlyVersion: UInt32 = 3
    /// Written while a leg's bitmap is written behind: a build that knows
    /// nothing of it (it reads 1 to 3) refuses the legs rather than trust
    /// that leg's bitmap after a crash.
    static let bitmapBehindVersion: UInt32 = 4
    static let readableVersions: ClosedRange<UInt32> = 1...4
    static let maxLegs = 64

    var mirror: MirrorUUID
    /// Which leg this copy of the superblock is on.
    var legIndex: Int
    var events: UInt64
    /// Changes, to a new random value, whenever a leg leaves the mirror
    /// (DRBD's current data-generation UUID): a leg that is failed keeps the
    /// one it had, and a leg written by a server that ran without the
    /// others gets one of its own. 0 in metadata written before it existed.
    var generation: UInt64
    var regionBytes: UInt32
    /// Set at a clean stop: the in-sync legs are equal. Cleared when the
    /// mirror starts; a start that finds it cleared resyncs dirty regions.
    var clean: Bool
    /// Set on a leg served on its own, writable (`serve --force`), by that
    /// server: its data may differ from the other legs' anywhere.
    var servedRaw = false
    /// Set on a leg taken out of the mirror for good (remove-leg, or the old
    /// leg once a replacement is in sync): it can no longer be served as one
    /// of the mirror's legs.
    var removed = false
    /// The event of the superblock that marked the legs holding the data
    /// of the last bits cleared (md's events_cleared): a leg older than that
    /// may lack data in regions whose bits are gone, so no bitmap says what
    /// it misses.
    var eventsCleared: UInt64 = 0
    var legBytes: UInt64
    var dataOffset: UInt64
    var dataBytes: UInt64
    var legs: [LegRecord]
    /// The server that holds the legs, while it serves a mirror that
    /// another machine could open (DRBD's primary, sanlock's lease): set in
    /// every superblock it writes, cleared at its clean stop.
    var owner: MirrorOwner?

    private enum Field {
        static let magic = 0, version = 8, mirror = 16, legIndex = 32, legCount = 36, events = 40
        static let regionBytes = 48, flags = 52, legBytes = 56, dataOffset = 64, dataBytes = 72, generation = 80
        static let eventsCleared = 88, ownerHost = 96, ownerBoot = 112
        /// The owner's pid, lease and instance, in the last 16 bytes before
        /// the checksum (servers before the instance left its 8 bytes 0).
        static let ownerPid = checksum - 16, ownerLease = checksum - 12, ownerInstance = checksum - 8
        static let namesEnd = checksum - 16
        static let legs = 128, legRecordBytes = 32
        /// Each leg's name (a 2-byte length, then UTF-8), in leg order, after
        /// the largest leg table; one that does not fit is left out (length 0).
        static let names = legs + maxLegs * legRecordBytes
        static let checksum = MirrorLayout.slotBytes - 4
    }

    func encoded() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: MirrorLayout.slotBytes)
        bytes.replaceSubrange(0..<8, with: Self.magic)
        let version = legs.contains(where: \.bitmapBehind) ? Self.bitmapBehindVersion
            : legs.contains(where: \.writeMostly) ? Self.writeMostlyVersion : Self.version
        bytes.store(version, at: Field.version)
        bytes.store(mirror, at: Field.mirror)
        bytes.store(UInt32(legIndex), at: Field.legIndex)
        bytes.store(UInt32(legs.count), at: Field.legCount)
        bytes.store(events, at: Field.events)
        bytes.store(regionBytes, at: Field.regionBytes)
        bytes.store(UInt32(clean ? 1 : 0) | UInt32(servedRaw ? 2 : 0) | UInt32(removed ? 4 : 0) | UInt32(owner == nil ? 0 : 8),
                    at: Field.flags)
        if let owner {
            bytes.store(owner.host, at: Field.ownerHost)
            bytes.store(owner.boot, at: Field.ownerBoot)
            bytes.store(owner.pid, at: Field.ownerPid)
            bytes.store(owner.leaseMilliseconds, at: Field.ownerLease)
            bytes.store(owner.instance, at: Field.ownerInstance)
        }
        bytes.store(eventsCleared, at: Field.eventsCleared)
        bytes.store(legBytes, at: Field.legBytes)
        bytes.store(dataOffset, at: Field.dataOffset)
        bytes.store(dataBytes, at: Field.dataBytes)
        bytes.store(generation, at: Field.generation)
        for (index, leg) in legs.enumerated() {
            let at = Field.legs + index * Field.legRecordBytes
            bytes.store(leg.uuid, at: at)
            // The state's low byte, the cause in the next, then the leg it
            // replaces plus one (0 in older metadata, and for none), then
            // flags: write-mostly, bitmap behind.
            let replaces = UInt32(leg.replaces.map { $0 + 1 } ?? 0)
            let flags: UInt32 = (leg.writeMostly ? 1 : 0) | (leg.bitmapBehind ? 2 : 0)
            bytes.store(leg.state.rawValue | leg.cause.rawValue << 8 | replaces << 16 | flags << 24, at: at + 16)
            bytes.store(UInt32(bitPattern: leg.errno), at: at + 20)
            bytes.store(leg.failedGeneration, at: at + 24)
        }
        var at = Field.names
        for (index, leg) in legs.enumerated() {
            let name = Array(leg.name.utf8)
            // Room for this name and an empty one for each leg after it.
            let fits = at + 2 + name.count + 2 * (legs.count - index - 1) <= Field.namesEnd && name.count <= 0xFFFF
            bytes.store(UInt16(fits ? name.count : 0), at: at)
            if fits { bytes.replaceSubrange(at + 2..<at + 2 + name.count, with: name) }
            at += 2 + (fits ? name.count : 0)
        }
        bytes.store(crc32c(bytes[0..<Field.checksum]), at: Field.checksum)
        return bytes
    }

    enum Decoded {
        case superblock(Superblock)
        /// No magic: never part of a mirror (or overwritten).
        case none
        case corrupt(String)
    }

    static func decode(_ bytes: [UInt8]) -> Decoded {
        guard bytes.count >= MirrorLayout.slotBytes, Array(bytes[0..<8]) == magic else { return .none }
        guard bytes.load(UInt32.self, at: Field.checksum) == crc32c(bytes[0..<Field.checksum]) else {
            return .corrupt("checksum mismatch")
        }
        let version: UInt32 = bytes.load(UInt32.self, at: Field.version)
        guard readableVersions.contains(version) else {
            return .corrupt("format version \(version), this build reads \(readableVersions.lowerBound) to \(readableVersions.upperBound)")
        }
        let legCount = Int(bytes.load(UInt32.self, at: Field.legCount))
        let legIndex = Int(bytes.load(UInt32.self, at: Field.legIndex))
        guard (1...maxLegs).contains(legCount), legIndex < legCount else {
            return .corrupt("leg \(legIndex) of \(legCount)")
        }
        var legs: [LegRecord] = []
        var nameAt = Field.names
        // With an owner, the names end where its pid and lease begin (older
        // superblocks, without one, may use the bytes up to the checksum).
        let namesEnd = bytes.load(UInt32.self, at: Field.flags) & 8 != 0 ? Field.namesEnd : Field.checksum
        for index in 0..<legCount {
            let at = Field.legs + index * Field.legRecordBytes
            let word = bytes.load(UInt32.self, at: at + 16)
            guard let state = LegState(rawValue: word & 0xFF) else { return .corrupt("leg \(index) has an unknown state") }
            let nameLength = Int(bytes.load(UInt16.self, at: nameAt))
            // As written: room left for the length of each name after it.
            guard nameAt + 2 + nameLength + 2 * (legCount - index - 1) <= namesEnd else {
                return .corrupt("leg \(index)'s name runs past the slot")
            }
            legs.append(LegRecord(uuid: bytes.loadUUID(at: at), state: state,
                                  cause: LegCause(rawValue: word >> 8 & 0xFF) ?? .unknown,
                                  errno: Int32(bitPattern: bytes.load(UInt32.self, at: at + 20)),
                                  failedGeneration: bytes.load(UInt64.self, at: at + 24),
                                  // A hint: one that is not UTF-8 is not shown.
                                  name: String(validating: bytes[nameAt + 2..<nameAt + 2 + nameLength], as: UTF8.self) ?? "",
                                  replaces: (1...legCount).contains(Int(word >> 16 & 0xFF)) ? Int(word >> 16 & 0xFF) - 1 : nil,
                                  writeMostly: word >> 24 & 1 != 0, bitmapBehind: word >> 25 & 1 != 0))
            nameAt += 2 + nameLength
        }
        return .superblock(Superblock(
            mirror: bytes.loadUUID(at: Field.mirror), legIndex: legIndex,
            events: bytes.load(UInt64.self, at: Field.events),
            generation: bytes.load(UInt64.self, at: Field.generation),
            regionBytes: bytes.load(UInt32.self, at: Field.regionBytes),
            clean: bytes.load(UInt32.self, at: Field.flags) & 1 != 0,
            servedRaw: bytes.load(UInt32.self, at: Field.flags) & 2 != 0,
            removed: bytes.load(UInt32.self, at: Field.flags) & 4 != 0,
            eventsCleared: bytes.load(UInt64.self, at: Field.eventsCleared),
            legBytes: bytes.load(UInt64.self, at: Field.legBytes),
            dataOffset: bytes.load(UInt64.self, at: Field.dataOffset),
            dataBytes: bytes.load(UInt64.self, at: Field.dataBytes),
            legs: legs,
            owner: bytes.load(UInt32.self, at: Field.flags) & 8 == 0 ? nil
                : MirrorOwner(host: bytes.loadUUID(at: Field.ownerHost), boot: bytes.loadUUID(at: Field.ownerBoot),
                        pid: bytes.load(UInt32.self, at: Field.ownerPid),
                        leaseMilliseconds: bytes.load(UInt32.self, at: Field.ownerLease),
                        instance: bytes.load(UInt64.self, at: Field.ownerInstance))))
    }
}

/// Who holds a mirror's legs: a machine (its host id, /etc/machine-id or
/// --host-id), its boot, the server's pid and instance, and how long its
/// lease lasts without a renewal.
public struct MirrorOwner: Sendable, Hashable, CustomStringConvertible {
    public var host: MirrorUUID
    public var boot: MirrorUUID
    public var pid: UInt32
    public var leaseMilliseconds: UInt32
    /// A random number of the server's run, never 0: host, boot and pid
    /// are the same for two servers that are each pid 1 of a container on
    /// one machine with one host id, and for a server and the one started
    /// in its container after it.
    public var instance: UInt64

    public var lease: Duration { .milliseconds(leaseMilliseconds) }

    /// The same server (not only the same machine).
    func isSameServer(as other: MirrorOwner) -> Bool {
        host == other.host && boot == other.boot && pid == other.pid && instance == other.instance
    }

    public var description: String {
        "host \(host) (pid \(pid), boot \(boot), instance \(String(instance, radix: 16)))"
    }
}

extension Superblock {
    /// Leg `legIndex`'s superblock of a mirror with `layout`.
    init(mirror: MirrorUUID, legIndex: Int, events: UInt64, generation: UInt64, clean: Bool,
         eventsCleared: UInt64 = 0, layout: MirrorLayout, legs: [LegRecord]) {
        self.init(mirror: mirror, legIndex: legIndex, events: events, generation: generation,
                  regionBytes: layout.regionBytes, clean: clean, eventsCleared: eventsCleared,
                  legBytes: layout.legBytes, dataOffset: layout.dataOffset, dataBytes: layout.dataBytes, legs: legs)
    }

    /// This leg's own entry.
    var own: LegRecord { legs[legIndex] }

    /// The entry of the leg whose UUID is `uuid`, if this superblock has one.
    func record(of uuid: MirrorUUID) -> LegRecord? { legs.first { $0.uuid == uuid } }

    /// Whether this leg was written after the mirror failed it in
    /// `failedGeneration` (a server ran it without the legs that recorded
    /// its failure): then it may hold data they lack. nil when the
    /// metadata is too old to tell.
    func movedOn(sinceFailedIn failedGeneration: UInt64) -> Bool? {
        guard failedGeneration != 0, generation != 0 else { return nil }
        return generation != failedGeneration
    }

    /// Orders legs' superblocks for the mirror's view: a leg served on its
    /// own, writable, comes last whatever its events, then fewer events.
    static func isLessCurrent(_ a: Superblock, _ b: Superblock) -> Bool {
        (a.servedRaw ? 0 : 1, a.events) < (b.servedRaw ? 0 : 1, b.events)
    }

    /// A new generation: random, never 0 (which means "not recorded").
    static func newGeneration() -> UInt64 { .random(in: 1 ... .max) }
}

extension [UInt8] {
    fileprivate mutating func store<Value: FixedWidthInteger>(_ value: Value, at offset: Int) {
        withUnsafeMutableBytes { $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: Value.self) }
    }

    fileprivate mutating func store(_ uuid: MirrorUUID, at offset: Int) {
        store(uuid.high.bigEndian, at: offset)
        store(uuid.low.bigEndian, at: offset + 8)
    }

    fileprivate func load<Value: FixedWidthInteger>(_: Value.Type, at offset: Int) -> Value {
        Value(littleEndian: withUnsafeBytes { $0.loadUnaligned(fromByteOffset: offset, as: Value.self) })
    }

    fileprivate func loadUUID(at offset: Int) -> MirrorUUID {
        MirrorUUID(high: UInt64(bigEndian: load(UInt64.self, at: offset)),
                   low: UInt64(bigEndian: load(UInt64.self, at: offset + 8)))
    }
}
