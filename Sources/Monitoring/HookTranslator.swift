import BlockTargets
import Mirror

/// One call of an event program, as mdadm --monitor --program makes it:
/// `PROGRAM EVENT MIRROR [LEG-DEVICE]`, and what its environment says.
public struct HookCall: Sendable, Equatable {
    /// mdadm's name: Fail, FailSpare, DegradedArray, RebuildStarted,
    /// RebuildNN, RebuildFinished, SpareActive, TestMessage.
    public var event: String
    public var mirror: String
    public var leg: Int?
    public var device: String?
    public var errno: String?
    /// The event's line, as `dmio-nbd events` prints it.
    public var line: String
}

/// Turns the mirror's events into mdadm's, keeping what a call names that
/// an event may not carry (each leg's device) and how far a resync was told.
public struct HookTranslator {
    private let mirror: String
    private var devices: [Int: String]
    private let startsDegraded: Bool
    /// RebuildNN comes at each multiple of this many percent.
    private let increment: Int
    /// The last RebuildNN of the resync under way.
    private var rebuildReported = 0

    public init(_ status: MirrorStatus, increment: Int) {
        mirror = status.uuid
        self.increment = increment
        devices = Dictionary(uniqueKeysWithValues: status.legs.map { ($0.index, $0.device) })
        startsDegraded = status.legs.contains { $0.condition == .degraded || $0.condition == .missing }
    }

    private func call(_ event: String, leg: Int? = nil, errno: String? = nil, line: String) -> HookCall {
        HookCall(event: event, mirror: mirror, leg: leg, device: leg.flatMap { devices[$0] }, errno: errno, line: line)
    }

    /// The events that can make a call: leg changes, resyncs and scrubs (not
    /// connections, not metadata writes, which would fill the hook's queue).
    public static let wants: @Sendable (Event) -> Bool = { ["change", "resync", "scrub"].contains($0.verb) }

    /// What the start calls: DegradedArray for a mirror that starts with a leg out, and TestMessage.
    public func startCalls(test: Bool) -> [HookCall] {
        (startsDegraded ? [call("DegradedArray", line: "exists mirror mirror:\(mirror) degraded")] : [])
            + (test ? [call("TestMessage", line: "test mirror mirror:\(mirror)")] : [])
    }

    public mutating func calls(for event: Event) -> [HookCall] {
        guard event["mirror"] == mirror else { return [] }
        // mdadm tells a check or repair as it tells a resync (md runs them as
        // sync actions); the line says which, and what it found.
        switch (event.verb == "scrub" ? "resync" : event.verb, event.object) {
        case ("change", "leg"):
            guard let leg = event["leg"].flatMap(Int.init), let state = event["state"] else { return [] }
            if let device = event["device"]?.split(separator: "->").last.map(String.init) { devices[leg] = device }
            let parts = state.split(separator: "->").map(String.init)
            guard parts.count == 2, let was = LegCondition(rawValue: parts[0]), let now = LegCondition(rawValue: parts[1]) else {
                return []
            }
            switch (was, now) {
            case (.inSync, .degraded), (.inSync, .missing):
                return [call("Fail", leg: leg, errno: event["errno"], line: event.line)]
            case (.rebuilding, .degraded), (.rebuilding, .missing):
                return [call("FailSpare", leg: leg, errno: event["errno"], line: event.line)]
            case (.rebuilding, .inSync):
                return [call("SpareActive", leg: leg, line: event.line)]
            default:
                return []
            }
        case ("resync", "started"):
            rebuildReported = 0
            return [call("RebuildStarted", line: event.line)]
        case ("resync", "progress"):
            // As mdadm: the multiple of the increment reached, once each, never 0 or 100.
            guard let percent = event["percent"].flatMap(Int.init) else { return [] }
            let reached = percent / increment * increment
            guard reached > rebuildReported, reached < 100 else { return [] }
            rebuildReported = reached
            // mdadm's names: Rebuild05, Rebuild20.
            return [call(reached < 10 ? "Rebuild0\(reached)" : "Rebuild\(reached)", line: event.line)]
        case ("resync", "finished"):
            return [call("RebuildFinished", line: event.line)]
        default:
            return []
        }
    }
}
