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

    /// Two superblocks naming the far leg, durable: both slots say so.
    private func recordTwice(_ behind: BitmapPagesBehind) {
        #expect(!behind.recorded(behind.beginRecord(legs.snapshot)), "the first asks for another")
        #expect(behind.recorded(behind.beginRecord(legs.snapshot)))
    }

    @Test func nothingGoesBehindBeforeTwoSuperblocksSaySo() throws {
        let behind = BitmapPagesBehind(enabled: true)
        #expect(behind.claim([0], legs.snapshot).isEmpty)
        #expect(behind.isRecordWrong(legs.snapshot))
        let named = behind.beginRecord(legs.snapshot)
        #expect(named == [far])
        #expect(behind.claim([0], legs.snapshot).isEmpty, "before the superblock is durable")
        #expect(!behind.recorded(named))
        #expect(behind.claim([0], legs.snapshot).isEmpty, "one slot only")
        #expect(behind.recorded(behind.beginRecord(legs.snapshot)))
        #expect(!behind.isRecordWrong(legs.snapshot))
        let snapshot = legs.snapshot
        #expect(behind.claim([0], snapshot).map(\.leg.index) == [1])
        // A superblock that no longer names it stops its pages at its start
        // (a claim with a snapshot from before the change too).
        #expect(!behind.ended(0, on: farLeg.device, failed: false).isAgain)
        #expect(try legs.setWriteMostly(1, false), "it was write-mostly")
        _ = behind.beginRecord(legs.snapshot)
        #expect(behind.claim([0], snapshot).isEmpty)
        // Without write-behind, no leg is ever named.
        #expect(BitmapPagesBehind(enabled: false).beginRecord(legs.snapshot).isEmpty)
    }

    @Test func aPageChangedOnItsWayIsWrittenAgainAndTheLegStaysNamedUntilItLands() throws {
        let behind = BitmapPagesBehind(enabled: true)
        recordTwice(behind)
        #expect(behind.claim([0, 1], legs.snapshot).first?.pages == [0, 1])
        // Page 0 again while its write is on its way: it waits for that one.
        #expect(behind.claim([0], legs.snapshot).first?.pages == [])
        #expect(behind.ended(0, on: farLeg.device, failed: false).isAgain, "written again")
        #expect(!behind.ended(0, on: farLeg.device, failed: false).isAgain)
        #expect(!behind.ended(1, on: farLeg.device, failed: false).isAgain)
        // The leg no longer written behind: named while pages are under way, not after.
        #expect(try legs.setWriteMostly(1, false), "it was write-mostly")
        #expect(behind.beginRecord(legs.snapshot).isEmpty)
        behind.waitUntilLanded(nil)
    }

    @Test func aPageThatFailedKeepsTheLegNamedUntilItLandsWithTheOthers() throws {
        let behind = BitmapPagesBehind(enabled: true)
        recordTwice(behind)
        _ = behind.claim([3], legs.snapshot)
        #expect(behind.ended(3, on: farLeg.device, failed: true) == .withNextCommit)
        let (device, far) = (farLeg.device, far)
        #expect(try legs.setWriteMostly(1, false), "it was write-mostly")
        #expect(behind.beginRecord(legs.snapshot) == [far], "it misses page 3")
        behind.sendingWithOthers([3], to: [device])
        behind.landedWithOthers([3], on: [device])
        #expect(behind.beginRecord(legs.snapshot).isEmpty)
    }

    /// A leg that begins to get the bitmap with the others (set-leg
    /// --no-write-mostly) is not written behind again, even for a page that
    /// changed on its way: that one goes with the next commit.
    @Test func aLegSentWithTheOthersIsNotWrittenBehindAgain() {
        let behind = BitmapPagesBehind(enabled: true)
        recordTwice(behind)
        let device = farLeg.device
        _ = behind.claim([0], legs.snapshot)
        _ = behind.claim([0], legs.snapshot)
        behind.sendWithOthers(device, true)
        #expect(behind.ended(0, on: device, failed: false) == .withNextCommit)
        behind.waitUntilLanded(device)
        #expect(behind.beginRecord(legs.snapshot) == [far], "it misses page 0")
        behind.sendingWithOthers([0], to: [device])
        behind.landedWithOthers([0], on: [device])
        behind.sendWithOthers(device, false)
        #expect(behind.beginRecord(legs.snapshot) == [far], "still write-mostly")
        // A leg brought in again gets the whole bitmap.
        _ = behind.claim([5], legs.snapshot)
        #expect(behind.ended(5, on: device, failed: true) == .withNextCommit)
        behind.landedWhole(on: device)
        behind.stop()
        #expect(behind.beginRecord(legs.snapshot).isEmpty)
    }

    @Test func aLegSentWithTheOthersAndTheStopGetNoPageBehind() {
        let behind = BitmapPagesBehind(enabled: true)
        recordTwice(behind)
        behind.sendWithOthers(farLeg.device, true)
        #expect(behind.claim([0], legs.snapshot).isEmpty)
        behind.sendWithOthers(farLeg.device, false)
        #expect(!behind.claim([0], legs.snapshot).isEmpty)
        #expect(behind.ended(0, on: farLeg.device, failed: false) == .done)
        behind.stop()
        #expect(behind.claim([0], legs.snapshot).isEmpty)
        #expect(behind.beginRecord(legs.snapshot).isEmpty)
    }
}

extension BitmapPagesBehind.PageEnd {
    var isAgain: Bool { self == .again }
}
