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
        try legs.failByOperator(0, retriesLostLegs: false)
        let second = legs.recorded
        #expect(second.legs[0].failedGeneration == first)
        #expect(second.generation != first && second.generation != 0)
        legs.fail(legs.snapshot.writable.first { $0.index == 2 }!, errno: EIO, reading: false)
        let third = legs.recorded
        #expect(third.legs[2].failedGeneration == second.generation)
        #expect(third.legs[0].failedGeneration == first)
        #expect(third.generation != second.generation)
        _ = try legs.bringIn(.at(0), device: devices[0], uuid: .random())
        #expect(legs.recorded.legs[0].failedGeneration == 0)
        #expect(legs.recorded.generation == third.generation)
    }

    @Test func aChangeOnlyALegDegradedSinceTookIsNotHeld() throws {
        let legs = table([.inSync, .inSync])
        let sent = legs.snapshot
        try legs.failByOperator(0, retriesLostLegs: false)
        // Leg 1, now the last in sync, refuses it: it stays in sync, without it.
        let settlement = legs.settle([failure(sent, leg: 1)], sentTo: sent.writable)
        #expect(!settlement.held)
        #expect(settlement.degraded.isEmpty)
        #expect(legs.member(1).state == .inSync)
    }

    @Test func aChangeHeldByAnotherInSyncLegDegradesTheLegThatFailed() {
        let legs = table([.inSync, .inSync, .inSync])
        let sent = legs.snapshot
        let settlement = legs.settle([failure(sent, leg: 0)], sentTo: sent.writable)
        #expect(settlement.held)
        #expect(settlement.degraded.map(\.index) == [0])
        #expect(settlement.version == legs.snapshot.version)
        #expect(legs.member(0).state == .degraded)
    }

    @Test func aRebuildThatFinishedFirstMakesItsLegAHolder() {
        let legs = table([.inSync, .rebuilding])
        let sent = legs.snapshot
        #expect(legs.finishRebuilds(LegTable.Targets([sent.writable[1]]))?.inSync == [1])
        let settlement = legs.settle([failure(sent, leg: 0)], sentTo: sent.writable)
        #expect(settlement.held, "leg 1 is in sync now and holds it")
        #expect(legs.member(0).state == .degraded)
    }

    /// A leg failed and re-added during a rebuild pass gets a new device,
    /// which the allocator may make where the old one was freed: the pass,
    /// which copied only what the leg lacked when it began, must not take
    /// it for the device it copied to and call the leg in sync.
    @Test func aPassDoesNotFinishTheRebuildOfALegReaddedOnADeviceMadeWhereItsOldOneWas() throws {
        let path = fixture.path("readded")
        let options = DeviceOptions(createSize: 1 << 20)
        let legs = LegTable([
            LegTable.Member(name: devices[0].name, device: devices[0], uuid: .random(), state: .inSync),
            LegTable.Member(name: path, device: try BlockDevice.open(path, options: options), uuid: .random(),
                            state: .rebuilding),
        ], generation: 1)
        legs.beginRebuildPass()
        let targets = LegTable.Targets(legs.snapshot.writable.filter { $0.index == 1 })
        let freed = ObjectIdentifier(try #require(legs.member(1).device))
        try legs.failByOperator(1, retriesLostLegs: false)
        _ = try legs.releaseDevice(of: 1)
        // Freed now: glibc's allocator gives its memory to a later object of
        // its size, as a rule the next or one of the next few (one that holds
        // freed memory back, as a sanitizer's does, leaves the last opened).
        var opened: [BlockDevice] = []
        while opened.count < 64, !opened.contains(where: { ObjectIdentifier($0) == freed }) {
            opened.append(try BlockDevice.open(path, options: options))
        }
        let readded = opened.first { ObjectIdentifier($0) == freed } ?? opened[opened.count - 1]
        _ = try legs.bringIn(.at(1), device: readded, uuid: .random())
        #expect(legs.member(1).state == .rebuilding)
        #expect(legs.finishRebuilds(targets)?.inSync == [])
        #expect(legs.member(1).state == .rebuilding)
    }

    @Test func aChangeOnlyARebuildingLegTookKeepsTheRebuildFromFinishing() {
        let legs = table([.inSync, .rebuilding])
        legs.beginRebuildPass()
        let sent = legs.snapshot
        let settlement = legs.settle([failure(sent, leg: 0)], sentTo: sent.writable)
        #expect(!settlement.held)
        #expect(legs.member(0).state == .inSync, "the last in-sync leg is never degraded")
        #expect(legs.finishRebuilds(LegTable.Targets([sent.writable[1]])) == nil)
        #expect(legs.member(1).state == .rebuilding)
        // The next pass starts afresh.
        legs.beginRebuildPass()
        #expect(legs.finishRebuilds(LegTable.Targets([sent.writable[1]]))?.inSync == [1])
    }
}

extension LegTableTests {
    /// A replacement of a leg in sync is copied to beside it and takes its
    /// place once in sync; a failure seen before the legs moved still finds
    /// its leg.
    @Test func aReplacementTakesItsLegsPlaceAndFailuresFollowTheLegsThatMoved() throws {
        let legs = table([.inSync, .inSync])
        let before = legs.snapshot
        let index = try legs.bringIn(.added(replacing: 0), device: devices[2], uuid: .random())
        #expect(index == 2 && legs.member(2).replaces == 0)
        #expect(throws: MirrorError.self) { try legs.remove(0) }
        let copying = LegTable.Targets(legs.snapshot.writable.filter { $0.index == 2 })
        let rebuilt = try #require(legs.finishRebuilds(copying))
        #expect(rebuilt.inSync == [0] && rebuilt.retired.map(\.name) == [devices[0].name])
        #expect(legs.all.map(\.name) == [devices[2].name, devices[1].name])
        #expect(legs.all.allSatisfy { $0.state == .inSync && $0.replaces == nil })
        // Leg 1 was seen at index 1 and is still there; the old leg 0 is gone.
        #expect(legs.fail(failure(before, leg: 1).leg, errno: EIO, reading: false))
        #expect(!legs.fail(failure(before, leg: 0).leg, errno: EIO, reading: false), "a leg that left is not failed")
    }

    @Test func removingALegMovesTheOthersDownAndKeepsTwo() throws {
        let legs = table([.inSync, .degraded, .inSync])
        let before = legs.snapshot
        let removed = try legs.remove(0)
        #expect(removed.name == devices[0].name)
        #expect(legs.all.map(\.name) == [devices[1].name, devices[2].name])
        // Leg 2, seen before at index 2, fails at index 1 now.
        #expect(legs.fail(failure(before, leg: 2).leg, errno: EIO, reading: false) == false, "the last in-sync leg stays")
        #expect(legs.member(1).writeErrors == 1)
        #expect(throws: MirrorError.self) { try legs.remove(0) }
    }

    @Test func removingALegKeepsTheLegsInSyncThatWritesNeed() throws {
        let legs = table([.inSync, .inSync, .degraded])
        #expect(throws: MirrorError.self) { try legs.remove(0, keepingInSync: 2) }
        #expect(throws: MirrorError.self) { try legs.remove(3) }
        #expect(try legs.remove(2, keepingInSync: 2).name == devices[2].name)
    }
}

extension LegTableTests {
    @Test func aMirrorGrowsToSixtyFourLegsAndNoFurther() throws {
        var members = (0..<2).map { LegTable.Member(name: devices[$0].name, device: devices[$0], uuid: .random(), state: .inSync) }
        members += (2..<Superblock.maxLegs).map { LegTable.Member(name: "gone\($0)", device: nil, uuid: .random(), state: .degraded) }
        let legs = LegTable(members, generation: 1)
        do {
            _ = try legs.bringIn(.added(replacing: nil), device: devices[2], uuid: .random())
            Issue.record("a 65th leg was added")
        } catch {
            #expect("\(error)".contains("the mirror has 64 legs, the most it can have"))
        }
        _ = try legs.remove(63)
        #expect(try legs.bringIn(.added(replacing: nil), device: devices[2], uuid: .random()) == 63)
    }
}

/// Write-mostly legs (md's): read last, written behind only while another
/// leg is in sync, and pulled ahead never as the last leg in sync.
extension LegTableTests {
    @Test func writeMostlyLegsAreReadLastAndWrittenBehindOnlyBesideAnotherInSyncLeg() throws {
        let legs = table([.inSync, .inSync, .rebuilding])
        #expect(try legs.setWriteMostly(0, true))
        #expect(try !legs.setWriteMostly(0, true))
        var snapshot = legs.snapshot
        #expect(snapshot.readable.map(\.index) == [1, 0])
        #expect(snapshot.readFirst == 1)
        #expect(snapshot.writeMostly.map(\.index) == [0])
        #expect(snapshot.writable.map(\.index) == [0, 1, 2])
        #expect(legs.recorded.legs.map(\.writeMostly) == [true, false, false])
        // Leg 1 out: the write-mostly leg is the only one to read, and to wait for.
        try legs.failByOperator(1, retriesLostLegs: false)
        snapshot = legs.snapshot
        #expect(snapshot.readable.map(\.index) == [0])
        #expect(snapshot.readFirst == 1)
        #expect(snapshot.writeMostly.isEmpty)
        // The last leg in sync is never pulled ahead.
        #expect(!legs.fallBehind(snapshot.readable[0]))
    }

    /// A leg being caught up is written behind too, and may be pulled
    /// ahead of again.
    @Test func aRebuildingWriteMostlyLegIsWrittenBehind() throws {
        let legs = table([.inSync, .rebuilding])
        _ = try legs.setWriteMostly(1, true)
        #expect(legs.snapshot.writeMostly.map(\.index) == [1])
        #expect(legs.fallBehind(legs.snapshot.writeMostly[0]))
        #expect(legs.member(1).cause == .behind)
    }

    @Test func aLegPulledAheadIsOutForThatCause() throws {
        let legs = table([.inSync, .inSync])
        _ = try legs.setWriteMostly(1, true)
        let version = legs.snapshot.version
        #expect(legs.fallBehind(legs.snapshot.writeMostly[0]))
        #expect(legs.member(1).state == .degraded && legs.member(1).cause == .behind)
        #expect(legs.member(1).condition == .behind)
        #expect(legs.snapshot.version > version)
        #expect(legs.snapshot.writable.map(\.index) == [0])
    }
}
