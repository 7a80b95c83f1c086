import BlockTargets
import DMIO

/// What the mirror tells its `EventSink`: each leg change as the leg table
/// makes it (under its lock, so in order), resync passes (start, each whole
/// percent of the way, end), and superblock writes. Every event carries
/// `mirror:UUID`.
struct MirrorEvents: Sendable {
    let sink: (any EventSink)?
    let mirror: String

    private func publish(_ verb: String, _ object: String, _ fields: [Event.Field]) {
        sink?.publish(Event(verb, object, [Event.Field("mirror", mirror)] + fields))
    }

    /// One `change leg` event for each leg whose state, cause or device changed.
    func legsChanged(from old: [LegTable.Told], to new: [LegTable.Told]) {
        guard sink != nil else { return }
        for (index, (before, after)) in zip(old, new).enumerated() {
            let was = before.condition, now = after.condition
            let replaced = before.name != after.name
            guard was != now || replaced || before.cause != after.cause else { continue }
            var fields = [Event.Field("leg", "\(index)"),
                          Event.Field("state", was == now ? now.rawValue : "\(was.rawValue)->\(now.rawValue)")]
            if replaced { fields.append(Event.Field("device", "\(before.name)->\(after.name)")) }
            if now == .degraded || now == .missing {
                fields.append(Event.Field("cause", after.cause.word))
                if after.errno != 0 { fields.append(Event.Field("errno", errnoName(after.errno))) }
            }
            publish("change", "leg", fields)
        }
    }

    func resyncStarted(reason: String, regions: Int, bytes: UInt64) {
        publish("resync", "started", [Event.Field("reason", reason), Event.Field("regions", "\(regions)"),
                                      Event.Field("bytes", "\(bytes)")])
    }

    func resyncProgress(percent: Int, regionsDone: Int, regions: Int) {
        publish("resync", "progress", [Event.Field("percent", "\(percent)"), Event.Field("regions-done", "\(regionsDone)"),
                                       Event.Field("regions", "\(regions)")])
    }

    func resyncFinished(outcome: String, regionsDone: Int, regions: Int) {
        publish("resync", "finished", [Event.Field("result", outcome), Event.Field("regions-done", "\(regionsDone)"),
                                       Event.Field("regions", "\(regions)")])
    }

    func metadataWritten(event: UInt64, legs: Int) {
        publish("metadata", "written", [Event.Field("event", "\(event)"), Event.Field("legs", "\(legs)")])
    }
}

extension LegTable.Member {
    var condition: LegCondition { LegCondition(state: state, cause: cause, opened: device != nil) }
}

extension MirrorStatus {
    /// The mirror as it is, as `exists` events: what a watcher gets before
    /// the changes (drbdsetup events2 --now).
    public var existsEvents: [Event] {
        let mirror = Event.Field("mirror", uuid)
        var events = [Event("exists", "mirror", [mirror, Event.Field("size", "\(size)"),
                                                 Event.Field("legs", "\(legs.count)"),
                                                 Event.Field("dirty-regions", "\(dirtyRegions)")])]
        for leg in legs {
            var fields = [mirror, Event.Field("leg", "\(leg.index)"), Event.Field("device", leg.device),
                          Event.Field("state", leg.condition.rawValue)]
            if let cause = leg.cause { fields.append(Event.Field("cause", cause.word)) }
            if leg.state == .degraded, let errno = leg.errno { fields.append(Event.Field("errno", errno)) }
            events.append(Event("exists", "leg", fields))
        }
        if resync.active {
            events.append(Event("exists", "resync", [mirror, Event.Field("reason", resync.reason),
                                                     Event.Field("regions-done", "\(resync.regionsDone)"),
                                                     Event.Field("regions", "\(resync.regionsTotal)")]))
        }
        return events
    }
}
