import DMIO
@testable import Mirror
import Synchronization
import Testing

/// The write-behind bookkeeping alone: places per leg, bytes, closed legs,
/// and the writes that wait for those they overlap.
@Suite struct WriteBehindUnitTests {
    private let fixture = MirrorFixture()
    private let devices: [BlockDevice]

    init() throws {
        let fixture = fixture
        devices = try (0..<2).map { try BlockDevice.open(fixture.path("leg\($0)"), options: DeviceOptions(createSize: 1 << 20)) }
    }

    private func leg(_ index: Int) -> LegTable.Leg { LegTable.Leg(index: index, device: devices[index], writeMostly: true) }

    @Test func aLegTakesAsManyWritesAsItsLimitAndTheBytesAllowThenIsFull() {
        let drained = Mutex(0)
        let behind = WriteBehind(policy: WriteBehindPolicy(limit: 2, onCongestion: .block, maxBytes: 8192)) {
            drained.withLock { $0 += 1 }
        }
        let first = behind.reserve([leg(0), leg(1)], range: 0..<4096, copying: 4096)
        #expect(first.ticket?.legs.count == 2 && first.full.isEmpty)
        // The bytes: a third write of 4 KiB goes beyond 8 KiB.
        let second = behind.reserve([leg(0)], range: 4096..<8192, copying: 4096)
        #expect(second.ticket != nil)
        let third = behind.reserve([leg(1)], range: 8192..<12288, copying: 4096)
        #expect(third.ticket == nil && third.full.map(\.index) == [1])
        // The count: leg 0 has 2, its limit.
        behind.ended(first.ticket!)
        #expect(behind.reserve([leg(0)], range: 0..<512, copying: 512).ticket != nil)
        #expect(behind.reserve([leg(0)], range: 0..<512, copying: 512).full.map(\.index) == [0])
        #expect(behind.backlog(of: devices[0]) == 2 && behind.backlog(of: devices[1]) == 0)
        // A closed leg is neither behind nor full.
        behind.close(devices[1])
        let closed = behind.reserve([leg(1)], range: 0..<512, copying: 512)
        #expect(closed.ticket == nil && closed.full.isEmpty)
    }

    @Test func aWriteThatOverlapsOneOutstandingWaitsForItAndOnlyForIt() {
        let behind = WriteBehind(policy: .default) {}
        let resumed = Mutex<[String]>([])
        #expect(behind.mayStart(0..<4096) { Issue.record("nothing outstanding: no wait") })
        let ticket = behind.reserve([leg(0)], range: 4096..<8192, copying: 4096).ticket!
        #expect(behind.mayStart(0..<4096) { Issue.record("beside it: no wait") })
        #expect(!behind.mayStart(6144..<10240) { resumed.withLock { $0.append("overlapping") } })
        #expect(!behind.mayStart(4096..<4097) { resumed.withLock { $0.append("inside") } })
        #expect(resumed.withLock { $0 }.isEmpty)
        behind.ended(ticket)
        #expect(resumed.withLock { $0 } == ["overlapping", "inside"])
        #expect(behind.outstandingCount == 0)
    }

    @Test func aLegPulledAheadIsToldWhenItsBacklogDrains() {
        let drained = Mutex(0)
        let behind = WriteBehind(policy: .default) { drained.withLock { $0 += 1 } }
        let ticket = behind.reserve([leg(0)], range: 0..<4096, copying: 4096).ticket!
        behind.pulledAhead(devices[0])
        #expect(drained.withLock { $0 } == 0)
        behind.ended(ticket)
        #expect(drained.withLock { $0 } == 1)
        // Pulled ahead with nothing outstanding: told at once.
        behind.pulledAhead(devices[1])
        #expect(drained.withLock { $0 } == 2)
    }

    /// A leg pulled ahead is caught up at once; pulled ahead again while
    /// caught up, or soon after it is back in sync, it waits 1 s, then 2,
    /// 4... up to a minute; back in sync for 10 s, it starts over.
    @Test func aLegPulledAheadAgainSoonAfterItsCatchUpWaitsLongerEachTime() {
        var pacing = CatchUpPacing()
        let leg = ObjectIdentifier(devices[0])
        let start = ContinuousClock.now
        func at(_ milliseconds: Int) -> ContinuousClock.Instant { start + .milliseconds(milliseconds) }
        pacing.pulledAhead(leg, at: at(0))
        #expect(pacing.mayCatchUp(leg, at: at(0)))
        var now = 0
        for (round, wait) in [1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000].enumerated() {
            pacing.catchingUp(leg)
            now += 200
            // Odd rounds: the catch-up ended, and the leg fell behind again 5 s later.
            if round % 2 == 1 {
                pacing.inSync(leg, at: at(now))
                now += 5000
            }
            pacing.pulledAhead(leg, at: at(now))
            #expect(pacing.nextCatchUp(after: at(now)) == at(now + wait), "wait \(wait)")
            #expect(!pacing.mayCatchUp(leg, at: at(now + wait - 1)), "wait \(wait)")
            #expect(pacing.mayCatchUp(leg, at: at(now + wait)), "wait \(wait)")
            now += wait
        }
        pacing.catchingUp(leg)
        pacing.inSync(leg, at: at(now))
        pacing.pulledAhead(leg, at: at(now + 10000))
        #expect(pacing.mayCatchUp(leg, at: at(now + 10000)))
        #expect(pacing.nextCatchUp(after: at(now + 10000)) == nil)
        // A catch-up of 30 s, and the leg behind again 5 s after it ended: it did not hold.
        now += 10000
        pacing.catchingUp(leg)
        pacing.inSync(leg, at: at(now + 30000))
        pacing.pulledAhead(leg, at: at(now + 35000))
        #expect(!pacing.mayCatchUp(leg, at: at(now + 35000)))
        #expect(pacing.mayCatchUp(leg, at: at(now + 36000)))
        #expect(pacing.mayCatchUp(ObjectIdentifier(devices[1]), at: at(0)))
    }
}
