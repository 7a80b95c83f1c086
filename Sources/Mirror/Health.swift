import Glibc
import BlockTargets

extension Mirror {
    /// The NBD meta context that shows where the mirror is degraded.
    public static let healthContext = "dmio:health"
    /// dmio:health flag: some leg does not hold this range's current data
    /// (written while a leg was out, being rebuilt, or awaiting recovery
    /// after an unclean stop); one more failure there could lose it.
    public static let notRedundant: UInt32 = 1 << 0

    public var metaContexts: [String] { [Self.healthContext] }

    public func blockStatus(context: String, offset: UInt64, length: UInt64, maxExtents: Int) throws -> [Extent] {
        guard context == Self.healthContext else {
            throw TargetResult.noMetaContext(context)
        }
        let everyLegHoldsIt = legs.allInSync && !isRecoveryPending
        let regionBytes = regionHash.regionBytes
        func health(at byte: UInt64) -> UInt32 {
            everyLegHoldsIt || !bitmap.isDirty(Int(byte / regionBytes)) ? 0 : Self.notRedundant
        }
        let end = offset + length
        var extents: [Extent] = []
        var start = offset
        while start < end && extents.count < maxExtents {
            let flags = health(at: start)
            var stop = min(end, (start / regionBytes + 1) * regionBytes)
            // Whole regions with the same health make one extent.
            while stop < end, stop - start < UInt64(UInt32.max) - regionBytes, health(at: stop) == flags {
                stop = min(end, stop + regionBytes)
            }
            extents.append(Extent(length: UInt32(stop - start), flags: flags))
            start = stop
        }
        return extents
    }
}
