import DMIO
import Glibc

/// What one leg's metadata says, read without the mirror (mdadm --examine):
/// which mirror and leg it is, its view of every leg, both superblock
/// slots, its bitmap.
public struct LegMetadata: Sendable, Codable, Hashable {
    public struct Leg: Sendable, Codable, Hashable {
        public var index: Int
        public var uuid: String
        public var state: LegState
        /// Why a degraded leg left; nil when not recorded.
        public var cause: LegCause?
        public var errno: String?
        /// The path or URI it was last served by, if recorded.
        public var name: String?
        /// For a leg being copied to in place of another: that leg's index.
        public var replaces: Int?
        /// Read last, written behind (nil in an older build's output: not).
        public var writeMostly: Bool?
    }

    public struct Slot: Sendable, Codable, Hashable {
        public var offset: UInt64
        /// The event it holds, nil when empty or damaged.
        public var events: UInt64?
        /// "empty", or what is wrong with it; nil when it holds a superblock.
        public var problem: String?
    }

    public var device: String
    public var mirror: String
    public var legIndex: Int
    public var legCount: Int
    public var events: UInt64
    public var generation: String
    /// Whether the mirror was stopped cleanly the last time this leg was written.
    public var clean: Bool
    /// Whether the leg was served on its own, writable, since (it will get a full copy).
    public var servedRaw: Bool
    /// Whether the leg was taken out of the mirror for good (remove-leg, or
    /// replaced); then `legIndex` means nothing and `legs` are the mirror's
    /// legs as they were when it left.
    public var removed: Bool?
    /// The server that holds the legs (a lease), if one does: "host UUID (pid
    /// N, boot UUID, instance HEX)"; nil when nobody does (a clean stop, or
    /// no lease).
    public var owner: String?
    /// The event at which bits were last cleared (an older copy needs a full copy).
    public var eventsCleared: UInt64
    public var regionBytes: UInt32
    public var legBytes: UInt64
    public var dataOffset: UInt64
    public var dataBytes: UInt64
    /// Regions this leg's bitmap marks as dirty.
    public var dirtyRegions: Int
    public var legs: [Leg]
    public var slots: [Slot]
}

extension Mirror {
    /// The metadata on `device`; throws `notAMirror` where it has none, and
    /// `corruptLeg` where both slots are damaged.
    public static func examine(_ device: BlockDevice, client: DMIOClient) throws(MirrorError) -> LegMetadata {
        let slots = try MetadataStore.readSlots(device, client: client)
        guard let superblock = try newestSuperblock(in: slots, of: device) else { throw .notAMirror(leg: device.name) }
        let layout = try MirrorLayout(validating: superblock)
        let bitmap = try MetadataStore.readBytes(device, offset: MirrorLayout.bitmapOffset, count: Int(layout.bitmapBytes),
                                                 client: client)
        let dirty = (0..<layout.regionCount).filter { bitmap[$0 / 8] & (1 << ($0 % 8)) != 0 }.count
        return LegMetadata(
            device: device.name, mirror: "\(superblock.mirror)", legIndex: superblock.legIndex,
            legCount: superblock.legs.count, events: superblock.events,
            generation: String(superblock.generation, radix: 16), clean: superblock.clean,
            servedRaw: superblock.servedRaw, removed: superblock.removed, owner: superblock.owner.map { "\($0)" },
            eventsCleared: superblock.eventsCleared,
            regionBytes: superblock.regionBytes, legBytes: superblock.legBytes, dataOffset: superblock.dataOffset,
            dataBytes: superblock.dataBytes, dirtyRegions: dirty,
            legs: superblock.legs.enumerated().map { index, record in
                LegMetadata.Leg(index: index, uuid: "\(record.uuid)", state: record.state,
                                cause: record.cause == .unknown ? nil : record.cause,
                                errno: record.errno == 0 ? nil : errnoName(record.errno),
                                name: record.name.isEmpty ? nil : record.name, replaces: record.replaces,
                                writeMostly: record.writeMostly)
            },
            slots: slots.enumerated().map { index, slot in
                let offset = MirrorLayout.slotOffset(index)
                switch slot {
                case .superblock(let found): return LegMetadata.Slot(offset: offset, events: found.events, problem: nil)
                case .none: return LegMetadata.Slot(offset: offset, events: nil, problem: "empty")
                case .corrupt(let reason): return LegMetadata.Slot(offset: offset, events: nil, problem: reason)
                }
            })
    }

    /// Records on `device`, a leg of a mirror about to be served on its own
    /// and writable, that its data may then differ from the other legs'
    /// anywhere: the mirror gives it a full copy when it comes back.
    public static func recordServedRaw(_ device: BlockDevice, client: DMIOClient) throws(MirrorError) {
        guard var superblock = try readSuperblock(of: device, client: client), !superblock.servedRaw else { return }
        superblock.servedRaw = true
        try MetadataStore.writeBytes(superblock.encoded(), offset: MirrorLayout.slotOffset(Int(superblock.events % 2)),
                                     to: [device], client: client)
    }

    /// Erases the mirror metadata on `device` (its superblocks and bitmap,
    /// the whole reserved area; the data after it is left), so that it can
    /// be used again: mdadm --zero-superblock. Refused while the mirror it
    /// belongs to is served. Damaged metadata (both slots) is erased too.
    /// Returns what it erased, in words.
    public static func wipe(_ device: BlockDevice, client: DMIOClient) throws(MirrorError) -> String {
        let superblock: Superblock?
        do {
            superblock = try readSuperblock(of: device, client: client)
        } catch {
            guard case .corruptLeg(_, let reason) = error else { throw error }
            try MetadataStore.writeBytes([UInt8](repeating: 0, count: 2 * MirrorLayout.slotBytes), offset: 0,
                                         to: [device], client: client)
            return "damaged mirror metadata (\(reason))"
        }
        guard let superblock else { throw .notAMirror(leg: device.name) }
        // The lock stays held while the metadata goes: no server starts
        // meanwhile. A leg removed from its mirror is not the mirror's to guard.
        let lock = superblock.removed ? nil : try MirrorLock(superblock.mirror)
        defer { lock?.release() }
        try MetadataStore.writeBytes([UInt8](repeating: 0, count: Int(superblock.dataOffset)), offset: 0,
                                     to: [device], client: client)
        return superblock.removed ? "the metadata of a leg removed from mirror \(superblock.mirror)"
                                  : "the metadata of leg \(superblock.legIndex) of mirror \(superblock.mirror)"
    }
}
