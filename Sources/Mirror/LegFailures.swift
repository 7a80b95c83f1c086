import DMIO
import Logging

/// The one path by which leg failures reach the mirror (dm-raid1 queues
/// them for kmirrord): whatever found one (a data request, a metadata
/// write, a copy, a flush), the failure degrades its leg in the leg table,
/// is said in the log, and goes on record in the superblocks, whose group
/// commit lives here for that reason. Nothing here calls back into the
/// mirror.
final class LegFailures: @unchecked Sendable {
    /// Writes the superblocks (the leg table, the events) to every leg not
    /// degraded, many requests at a time.
    let superblocks: GroupCommit
    private let legs: LegTable
    private let logger: Logger

    init(legs: LegTable, metadata: MetadataStore, logger: Logger) {
        self.legs = legs
        self.logger = logger
        superblocks = GroupCommit { done in
            metadata.writeSuperblocks { written in
                // A leg that failed this write is degraded; the next commit records it.
                let degraded = Self.degrade(written.failures, reading: false, legs: legs, logger: logger)
                metadata.settled(written)
                done(written.durable, !degraded.isEmpty || written.again)
            }
        }
    }

    /// Records the legs that failed a request or a metadata write; a leg
    /// degraded by it goes on record in the superblocks (nothing waits).
    func record(_ failures: [LegFailure], reading: Bool) {
        guard !failures.isEmpty else { return }
        if !Self.degrade(failures, reading: reading, legs: legs, logger: logger).isEmpty {
            superblocks.request { _ in }
        }
    }

    /// Records the legs that failed a write sent to `targets`, and says
    /// whether a leg in sync now holds the write.
    func settle(_ failures: [LegFailure], sentTo targets: [LegTable.Leg]) -> LegTable.Settlement {
        let settlement = legs.settle(failures, sentTo: targets)
        for failure in failures {
            Self.say(failure, reading: false, degraded: settlement.degraded.contains { $0.index == failure.leg.index },
                     logger: logger)
        }
        if !settlement.degraded.isEmpty { superblocks.request { _ in } }
        return settlement
    }

    /// Degrades the legs of `failures` that are not degraded yet; returns those.
    private static func degrade(_ failures: [LegFailure], reading: Bool, legs: LegTable,
                                logger: Logger) -> [LegFailure] {
        failures.filter { failure in
            let degraded = legs.fail(failure.leg, errno: failure.errno, reading: reading)
            say(failure, reading: reading, degraded: degraded, logger: logger)
            return degraded
        }
    }

    private static func say(_ failure: LegFailure, reading: Bool, degraded: Bool, logger: Logger) {
        let what = reading ? "read" : "write"
        if degraded {
            logger.error("leg \(failure.leg.index) (\(failure.leg.device.name)) degraded: \(what) failed with \(errnoDescription(failure.errno))")
        } else {
            logger.warning("leg \(failure.leg.index) (\(failure.leg.device.name)): \(what) failed with \(errnoDescription(failure.errno))")
        }
    }
}
