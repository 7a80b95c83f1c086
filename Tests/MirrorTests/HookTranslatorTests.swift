import BlockTargets
@testable import Mirror
@testable import Monitoring
import Testing

/// The mirror's events as mdadm's program calls, without a server: which
/// change is which event, and when RebuildNN comes.
struct HookTranslatorTests {
    static let uuid = "6f1c0000-0000-0000-0000-000000000001"

    private func status(_ states: [LegState], causes: [LegCause?] = []) -> MirrorStatus {
        MirrorStatus(
            uuid: Self.uuid, size: 1 << 30, regionBytes: 512 << 10, regions: 2048, dirtyRegions: 0, inSyncRegions: 2048,
            events: 1, bitmapWrites: 0,
            legs: states.enumerated().map { index, state in
                MirrorStatus.Leg(index: index, device: "/srv/leg\(index).img", kind: "file", state: state, error: nil,
                                 cause: index < causes.count ? causes[index] : nil, errno: nil, readErrors: 0,
                                 writeErrors: 0, outOfSyncBytes: 0)
            },
            resync: MirrorStatus.Resync(active: false, reason: "", regionsDone: 0, regionsTotal: 0, bytesCopied: 0,
                                        bytesPerSecond: 0, etaSeconds: nil, lastResult: "", rateLimit: 0))
    }

    private func change(_ leg: Int, _ transition: String, errno: String? = nil, mirror: String = uuid) -> Event {
        var fields = [Event.Field("mirror", mirror), Event.Field("leg", "\(leg)"), Event.Field("state", transition)]
        if let errno { fields.append(Event.Field("errno", errno)) }
        return Event("change", "leg", fields)
    }

    private func progress(_ percent: Int) -> Event {
        Event("resync", "progress", [Event.Field("mirror", Self.uuid), Event.Field("percent", "\(percent)")])
    }

    @Test func legChangesAreFailFailSpareAndSpareActive() {
        var translator = HookTranslator(status([.inSync, .inSync]), increment: 20)
        #expect(translator.startCalls(test: false).isEmpty)
        let fail = translator.calls(for: change(1, "in_sync->degraded", errno: "EIO"))
        #expect(fail == [HookCall(event: "Fail", mirror: Self.uuid, leg: 1, device: "/srv/leg1.img", errno: "EIO",
                                  line: change(1, "in_sync->degraded", errno: "EIO").line)])
        #expect(translator.calls(for: change(1, "degraded->rebuilding")).isEmpty, "a copy starting is no alarm")
        #expect(translator.calls(for: change(1, "rebuilding->missing")).map(\.event) == ["FailSpare"])
        #expect(translator.calls(for: change(1, "missing->rebuilding")).isEmpty)
        #expect(translator.calls(for: change(1, "rebuilding->in_sync")).map(\.event) == ["SpareActive"])
        #expect(translator.calls(for: change(0, "in_sync->missing")).map(\.event) == ["Fail"],
                "a second failure is Fail too, never DegradedArray")
        #expect(translator.calls(for: change(0, "in_sync->degraded", mirror: "another")).isEmpty)
    }

    @Test func degradedArrayOnlyWhenTheMirrorStartsWithALegOut() {
        let translator = HookTranslator(status([.inSync, .degraded], causes: [nil, .write]), increment: 20)
        #expect(translator.startCalls(test: true).map(\.event) == ["DegradedArray", "TestMessage"])
        let building = HookTranslator(status([.inSync, .rebuilding]), increment: 20)
        #expect(building.startCalls(test: false).isEmpty, "a leg being copied to is not out")
    }

    @Test func rebuildNNAtEachMultipleOfTheIncrementPassed() {
        func calls(increment: Int, _ percents: [Int]) -> [String] {
            var translator = HookTranslator(status([.inSync, .rebuilding]), increment: increment)
            var names = translator.calls(for: Event("resync", "started", [Event.Field("mirror", Self.uuid)])).map(\.event)
            for percent in percents { names += translator.calls(for: progress(percent)).map(\.event) }
            return names + translator.calls(for: Event("resync", "finished", [Event.Field("mirror", Self.uuid)])).map(\.event)
        }
        #expect(calls(increment: 20, Array(1...99)) == ["RebuildStarted", "Rebuild20", "Rebuild40", "Rebuild60", "Rebuild80",
                                                       "RebuildFinished"])
        #expect(calls(increment: 25, [16, 25, 33, 41, 50, 58, 66, 75, 83, 91]) == ["RebuildStarted", "Rebuild25", "Rebuild50",
                                                                                  "Rebuild75", "RebuildFinished"])
        // A jump past two multiples tells the last one once, as mdadm's polling does.
        #expect(calls(increment: 5, [3, 12, 14]) == ["RebuildStarted", "Rebuild10", "RebuildFinished"])
        #expect(calls(increment: 5, [5]) == ["RebuildStarted", "Rebuild05", "RebuildFinished"])
    }
}

extension HookTranslatorTests {
    /// mdadm tells md's check and repair as resyncs; a finding is in the line.
    @Test func aScrubIsToldAsARebuildAndItsMismatchesAreNot() {
        var translator = HookTranslator(status([.inSync, .inSync]), increment: 50)
        let mirror = Event.Field("mirror", Self.uuid)
        let scrub = { (object: String, fields: [Event.Field]) in Event("scrub", object, [mirror] + fields) }
        #expect(translator.calls(for: scrub("started", [Event.Field("action", "check")])).map(\.event) == ["RebuildStarted"])
        #expect(translator.calls(for: scrub("progress", [Event.Field("percent", "50")])).map(\.event) == ["Rebuild50"])
        #expect(translator.calls(for: scrub("mismatch", [Event.Field("region", "3")])).isEmpty)
        let finished = scrub("finished", [Event.Field("mismatched-regions", "1")])
        #expect(translator.calls(for: finished) == [HookCall(event: "RebuildFinished", mirror: Self.uuid, leg: nil,
                                                             device: nil, errno: nil, line: finished.line)])
        #expect(HookTranslator.wants(finished))
    }
}
