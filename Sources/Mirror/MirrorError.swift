import DMIO
import Glibc

/// Why a mirror could not be made, opened or changed. Each names the leg
/// and says what to do; none of them has written to a leg's data.
public enum MirrorError: Error, Sendable, Hashable, CustomStringConvertible {
    case tooFewLegs(Int)
    case tooManyLegs(Int)
    case invalidRegionSize(UInt32)
    case legTooSmall(bytes: UInt64, needed: UInt64)
    case open(DMIOError)
    case unequalSizes([String: UInt64])
    /// A leg with no mirror metadata where a mirror was expected.
    case notAMirror(leg: String)
    /// A leg that already holds mirror metadata where a new mirror was asked for.
    case alreadyAMirror(leg: String, mirror: MirrorUUID)
    /// A device that holds a file system, a partition table... (`what`).
    case holdsData(leg: String, what: [String])
    case corruptMetadata(String)
    case corruptLeg(leg: String, reason: String)
    case foreignLeg(leg: String, belongsTo: MirrorUUID, expected: MirrorUUID)
    case wrongPosition(leg: String, isLeg: Int, givenAs: Int)
    /// A leg that was replaced; `now` is the leg in its place, as the mirror
    /// last served it ("" if not known).
    case replacedLeg(leg: String, index: Int, mirror: MirrorUUID, now: String)
    case wrongLegCount(mirror: MirrorUUID, has: Int, given: Int, legsNow: [String])
    /// A leg taken out of its mirror for good (remove-leg, or replaced).
    case removedLeg(leg: String, mirror: MirrorUUID, legsNow: [String])
    case sizeChanged(leg: String, bytes: UInt64, expected: UInt64)
    case metadataIO(leg: String, errno: Int32)
    case noSuchLeg(Int, legCount: Int)
    /// No leg holding the mirror's data could be opened.
    case noLegAvailable([String])
    /// Legs the others record as in sync could not be opened: they may hold
    /// newer data.
    case missingLegs([String])
    /// Two legs each record the other as failed: each was used alone.
    case diverged(String, String)
    /// A leg to re-add was used without the legs now in sync.
    case usedAlone(leg: String)
    case invalidLegChange(String)
    /// Legs held by a server on another machine: its lease is current
    /// (`alive`), or ran out (then --takeover may take them).
    case ownedElsewhere(owner: MirrorOwner, alive: Bool, lease: Duration)
    /// The legs were written as this server took them over, before it
    /// wrote them: by their owner (nil: a clean stop, which names none).
    case takeoverRaced(owner: MirrorOwner?)
    /// This server's claim of the legs taken over was overwritten, on a leg
    /// at least, while it waited out the old owner's lease.
    case claimOverwritten(owner: MirrorOwner)
    case invalidOwnership(String)
    /// A check or repair that cannot start (or stop) now, and why.
    case scrubRefused(String)
    /// A leg with no usable metadata, which the other legs say is `index`.
    case unusableLeg(leg: String, index: Int, mirror: MirrorUUID, reason: String)
    /// Another process has the mirror open (it serves it); its pid where
    /// the lock file tells.
    case inUse(mirror: MirrorUUID, lock: String, pid: Int32?)
    /// A minimum of legs in sync that no write could meet (or none).
    case invalidMinInSync(Int, legCount: Int)

    public var description: String {
        switch self {
        case .tooFewLegs(let count):
            "a mirror needs at least 2 legs, \(count) given"
        case .tooManyLegs(let count):
            "a mirror has at most \(Superblock.maxLegs) legs, \(count) given"
        case .invalidMinInSync(let count, let legCount):
            "--min-in-sync-legs \(count): from 1 to the number of legs (\(legCount))"
        case .invalidRegionSize(let bytes):
            "region size \(bytes): must be a power of two of at least 4096 bytes"
        case .legTooSmall(let bytes, let needed):
            "a leg of \(bytes) bytes is too small: a mirror leg needs at least \(needed)"
        case .open(let error):
            "leg \(error)"
        case .unequalSizes(let sizes):
            "legs of unequal size: " + sizes.sorted { $0.key < $1.key }.map { "\($0.key) has \($0.value) bytes" }
                .joined(separator: ", ") + "; every leg of a mirror must have the same size"
        case .notAMirror(let leg):
            "leg \(leg) holds no dmio-nbd mirror metadata; to make a new mirror of it, run "
                + "`dmio-nbd create` (it overwrites the leg's first MiB)"
        case .alreadyAMirror(let leg, let mirror):
            "leg \(leg) already belongs to mirror \(mirror); serve it, or pass --force to overwrite it"
        case .holdsData(let leg, let what):
            "\(leg) appears to contain \(what.joined(separator: " and ")): making it a leg would destroy it; "
                + "if nothing on it is needed, pass --force to overwrite it"
        case .corruptMetadata(let reason):
            "mirror metadata is inconsistent: \(reason)"
        case .corruptLeg(let leg, let reason):
            "leg \(leg): mirror metadata is corrupt (\(reason)); refusing to use it"
        case .foreignLeg(let leg, let belongsTo, let expected):
            "leg \(leg) belongs to mirror \(belongsTo), not to mirror \(expected)"
        case .wrongPosition(let leg, let isLeg, let givenAs):
            "leg \(leg) is leg \(isLeg) of its mirror but was given as leg \(givenAs); give the legs in their order"
        case .replacedLeg(let leg, let index, let mirror, let now):
            "\(leg) was replaced in mirror \(mirror) and is no longer leg \(index)"
                + (now.isEmpty ? "" : "; leg \(index) is now \(now)")
                + " (give that instead; `dmio-nbd examine` tells what a device is, `dmio-nbd wipe` frees an old leg)"
        case .wrongLegCount(let mirror, let has, let given, let legsNow):
            "mirror \(mirror) has \(has) legs, \(given) given" + Self.legsHint(legsNow)
        case .removedLeg(let leg, let mirror, let legsNow):
            "\(leg) was removed from mirror \(mirror) and is none of its legs" + Self.legsHint(legsNow)
                + " (`dmio-nbd wipe` frees it for another use)"
        case .sizeChanged(let leg, let bytes, let expected):
            "leg \(leg) has \(bytes) bytes; the mirror was made with legs of \(expected)"
        case .metadataIO(let leg, let errno):
            "leg \(leg): cannot read or write mirror metadata: \(errnoDescription(errno))"
        case .noSuchLeg(let index, let count):
            "no leg \(index): the mirror has legs 0 to \(count - 1)"
        case .noLegAvailable(let legs):
            "no in-sync leg of the mirror could be opened (\(legs.joined(separator: ", "))); see the errors above"
        case .missingLegs(let legs):
            "legs \(legs.joined(separator: ", ")) cannot be opened, and the other legs last saw them in sync: "
                + "they may hold newer data. Bring them back, or start without them with --allow-missing-legs"
        case .diverged(let a, let b):
            "legs \(a) and \(b) were each used without the other, and their data differ; serve the one to keep "
                + "alone (move the other away, --allow-missing-legs), then put the other back with replace-leg"
        case .usedAlone(let leg):
            "leg \(leg) was used without the legs now in sync (its metadata records them as failed) and may hold "
                + "newer data; restart the mirror with it, or give it a full copy with replace-leg"
        case .scrubRefused(let reason), .invalidOwnership(let reason):
            reason
        case .ownedElsewhere(let owner, let alive, let lease):
            alive
                ? "the legs are held by the server on \(owner), which renewed its lease within the last "
                    + "\(lease) (two servers writing the same legs would destroy each other's data): stop it first"
                : "the legs were held by the server on \(owner), which has not renewed its lease for \(lease): "
                    + "if that machine is down or cut off for good, --takeover takes the legs over (it then "
                    + "writes nothing more, and stops serving, once it finds them taken)"
        case .takeoverRaced(let owner?):
            "the server on \(owner) wrote to the legs while this one took them over: it renewed its lease, so it "
                + "is alive (two servers writing the same legs would destroy each other's data): stop it first. "
                + "Nothing was written"
        case .takeoverRaced(nil):
            "the legs were stopped cleanly while this server took them over: start it again (no takeover is "
                + "needed). Nothing was written"
        case .claimOverwritten(let owner):
            "the server on \(owner) wrote over this server's claim of the legs while it took them over: that "
                + "server is alive, and keeps the legs unless it read the claim first (then it stops too). This one "
                + "writes nothing more: see which one serves before starting another"
        case .invalidLegChange(let reason):
            reason
        case .unusableLeg(_, let index, let mirror, let reason):
            "\(reason); the other legs say it is leg \(index) of mirror \(mirror). Start the mirror without it "
                + "with --allow-missing-legs (it is not touched), then put a device in its place with "
                + "`dmio-nbd replace-leg \(index) DEVICE`"
        case .inUse(let mirror, let lock, let pid):
            "mirror \(mirror) is in use by \(pid.map { "pid \($0)" } ?? "another process") (it holds \(lock)): "
                + "two servers on the same legs would overwrite each other's writes; stop the other one first"
        }
    }

    /// "; its legs, in order: /srv/a.img /srv/c.img", from the names the
    /// superblocks record (a leg's may be missing: "?").
    private static func legsHint(_ names: [String]) -> String {
        names.isEmpty ? "" : "; its legs, in order: " + names.map { $0.isEmpty ? "?" : $0 }.joined(separator: " ")
    }
}
