import DMIO
import Glibc
@testable import Mirror
import Testing

/// The leg table alone: how a change that went out to a snapshot of the
/// legs ends, when the legs changed while it was in flight.
@Suite struct LegTableTests {
    private let fixture = MirrorFixture()
    private let devices: [BlockDevice]

    init() throws {
        let fixture = fixture
        devices = try (0..<3).map { try BlockDevice.open(fixture.path("leg\($0)"), options: DeviceOptions(createSize: 1 << 20)) }
    }

    private func table(_ states: [LegState]) -> LegTable {
        LegTable(states.enumerated().map { index, state in
            LegTable.Member(name: devices[index].name, device: devices[index], uuid: .random(), state: state)
        }, generation: 1)
    }

    private func failure(_ snapshot: LegTable.Snapshot, leg: Int) -> LegFailure {
        LegFailure(leg: snapshot.writable.first { $0.index == leg }!, errno: EIO)
    }

    /// The generation is what tells a leg that is behind from one used
    /// alone: a failed leg keeps the one it was failed in, and the legs that
    /// go on get a new one each time a leg leaves.
    @Test func aFailedLegKeepsItsGenerationAndTheOthersGetANewOne() throws {
        let legs = table([.inSync, .inSync, .inSync])
        let first = legs.recorded.generation
        try legs.failByOperator(0)
        let second = legs.recorded
        #expect(second.legs[0].failedGeneration == first)
        #expect(second.generation != first && second.generation != 0)
        legs.fail(legs.snapshot.writable.first { $0.index == 2 }!, errno: EIO, reading: false)
        let third = legs.recorded
        #expect(third.legs[2].failedGeneration == second.generation)
        #expect(third.legs[0].failedGeneration == first)
        #expect(third.generation != second.generation)
        try legs.bringIn(0, device: devices[0], uuid: .random())
        #expect(legs.recorded.legs[0].failedGeneration == 0)
        #expect(legs.recorded.generation == third.generation)
    }

    @Test func aChangeOnlyALegDegradedSinceTookIsNotHeld() throws {
        let legs = table([.inSync, .inSync])
        let sent = legs.snapshot
        try legs.failByOperator(0)
        // Leg 1, now the last in sync, refuses it: it stays in sync, without it.
        let settlement = legs.settle([failure(sent, leg: 1)], sentTo: sent)
        #expect(!settlement.held)
        #expect(settlement.degraded.isEmpty)
        #expect(legs.member(1).state == .inSync)
    }

    @Test func aChangeHeldByAnotherInSyncLegDegradesTheLegThatFailed() {
        let legs = table([.inSync, .inSync, .inSync])
        let sent = legs.snapshot
        let settlement = legs.settle([failure(sent, leg: 0)], sentTo: sent)
        #expect(settlement.held)
        #expect(settlement.degraded.map(\.index) == [0])
        #expect(settlement.version == legs.snapshot.version)
        #expect(legs.member(0).state == .degraded)
    }

    @Test func aRebuildThatFinishedFirstMakesItsLegAHolder() {
        let legs = table([.inSync, .rebuilding])
        let sent = legs.snapshot
        #expect(legs.finishRebuilds(LegTable.Targets([sent.writable[1]])) == [1])
        let settlement = legs.settle([failure(sent, leg: 0)], sentTo: sent)
        #expect(settlement.held, "leg 1 is in sync now and holds it")
        #expect(legs.member(0).state == .degraded)
    }

    @Test func aChangeOnlyARebuildingLegTookKeepsTheRebuildFromFinishing() {
        let legs = table([.inSync, .rebuilding])
        legs.beginRebuildPass()
        let sent = legs.snapshot
        let settlement = legs.settle([failure(sent, leg: 0)], sentTo: sent)
        #expect(!settlement.held)
        #expect(legs.member(0).state == .inSync, "the last in-sync leg is never degraded")
        #expect(legs.finishRebuilds(LegTable.Targets([sent.writable[1]])) == nil)
        #expect(legs.member(1).state == .rebuilding)
        // The next pass starts afresh.
        legs.beginRebuildPass()
        #expect(legs.finishRebuilds(LegTable.Targets([sent.writable[1]])) == [1])
    }
}
