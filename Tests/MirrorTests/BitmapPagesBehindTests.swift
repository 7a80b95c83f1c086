import DMIO
@testable import Mirror
import Testing

/// Which legs get the bitmap behind, and the pages on their way, alone:
/// nothing goes behind before a superblock says so, the superblocks name a
/// leg while a page is on its way to it or missing there, and one write per
/// page and leg is on its way at a time.
@Suite struct BitmapPagesBehindTests {
    private let fixture = MirrorFixture()
    private let legs: LegTable

    init() throws {
        let fixture = fixture
        let devices = try (0..<2).map { try BlockDevice.open(fixture.path("leg\($0)"), options: DeviceOptions(createSize: 1 << 20)) }
        legs = LegTable(devices.indices.map { index in
            LegTable.Member(name: devices[index].name, device: devices[index], uuid: .random(), state: .inSync)
        }, generation: 1)
        _ = try legs.setWriteMostly(1, true)
    }

    private var farLeg: LegTable.Leg { legs.snapshot.writeMostly[0] }
    private var far: ObjectIdentifier { ObjectIdentifier(farLeg.device) }

    @Test func nothingGoesBehindBeforeASuperblockSaysSo() {
        let behind = BitmapPagesBehind(enabled: true)
        #expect(behind.claim([0], legs.snapshot).isEmpty)
        #expect(behind.isRecordWrong(legs.snapshot))
        let named = behind.beginRecord(legs.snapshot)
        #expect(named == [far])
        #expect(behind.claim([0], legs.snapshot).isEmpty, "before the superblock is durable")
        behind.recorded(named)
        #expect(!behind.isRecordWrong(legs.snapshot))
        #expect(behind.claim([0], legs.snapshot).map(\.leg.index) == [1])
        // Without write-behind, no leg is ever named.
        #expect(BitmapPagesBehind(enabled: false).beginRecord(legs.snapshot).isEmpty)
    }

    @Test func aPageChangedOnItsWayIsWrittenAgainAndTheLegStaysNamedUntilItLands() throws {
        let behind = BitmapPagesBehind(enabled: true)
        behind.recorded(behind.beginRecord(legs.snapshot))
        #expect(behind.claim([0, 1], legs.snapshot).first?.pages == [0, 1])
        // Page 0 again while its write is on its way: it waits for that one.
        #expect(behind.claim([0], legs.snapshot).first?.pages == [])
        #expect(behind.ended(0, on: farLeg.device, failed: false), "written again")
        #expect(!behind.ended(0, on: farLeg.device, failed: false))
        #expect(!behind.ended(1, on: farLeg.device, failed: false))
        // The leg no longer written behind: named while pages are under way, not after.
        try legs.setWriteMostly(1, false)
        #expect(behind.beginRecord(legs.snapshot).isEmpty)
        behind.waitUntilLanded(nil)
    }

    @Test func aPageThatFailedKeepsTheLegNamedUntilItLandsWithTheOthers() throws {
        let behind = BitmapPagesBehind(enabled: true)
        behind.recorded(behind.beginRecord(legs.snapshot))
        _ = behind.claim([3], legs.snapshot)
        #expect(!behind.ended(3, on: farLeg.device, failed: true))
        let (device, far) = (farLeg.device, far)
        try legs.setWriteMostly(1, false)
        #expect(behind.beginRecord(legs.snapshot) == [far], "it misses page 3")
        behind.sendingWithOthers([3], to: device)
        behind.landedWithOthers([3], on: device)
        #expect(behind.beginRecord(legs.snapshot).isEmpty)
    }

    @Test func aLegSentWithTheOthersAndTheStopGetNoPageBehind() {
        let behind = BitmapPagesBehind(enabled: true)
        behind.recorded(behind.beginRecord(legs.snapshot))
        behind.sendWithOthers(farLeg.device, true)
        #expect(behind.claim([0], legs.snapshot).isEmpty)
        behind.sendWithOthers(farLeg.device, false)
        #expect(!behind.claim([0], legs.snapshot).isEmpty)
        #expect(!behind.ended(0, on: farLeg.device, failed: false))
        behind.stop()
        #expect(behind.claim([0], legs.snapshot).isEmpty)
        #expect(behind.beginRecord(legs.snapshot).isEmpty)
    }
}
