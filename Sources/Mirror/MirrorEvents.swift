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

    /// One `change leg` event for each leg whose state, cause or device
    /// changed, or that moved (`moved-from:`, when a leg before it left);
    /// `create leg` for a leg added, `destroy leg` for one that left. A leg
    /// is followed by its UUID; one put in place of another (a replacement
    /// with a new UUID, at the same index) is a change of device.
    func legsChanged(from old: [LegTable.Told], to new: [LegTable.Told]) {
        guard sink != nil else { return }
        var unmatched = Set(old.indices)
        var formerIndex: [Int: Int] = [:]
        for (index, after) in new.enumerated() {
            let match = old.indices.first { unmatched.contains($0) && old[$0].uuid == after.uuid }
                ?? (unmatched.contains(index) && !new.contains { $0.uuid == old[index].uuid } ? index : nil)
            if let match {
                unmatched.remove(match)
                formerIndex[index] = match
            }
        }
        for gone in unmatched.sorted() {
            publish("destroy", "leg", [Event.Field("leg", "\(gone)"), Event.Field("device", old[gone].name)])
        }
        for (index, after) in new.enumerated() {
            guard let was = formerIndex[index] else {
                publish("create", "leg", [Event.Field("leg", "\(index)"), Event.Field("device", after.name),
                                          Event.Field("state", after.condition.rawValue)])
                continue
            }
            let before = old[was]
            let replaced = before.name != after.name
            guard before.condition != after.condition || replaced || before.cause != after.cause || was != index else { continue }
            var fields = [Event.Field("leg", "\(index)"),
                          Event.Field("state", before.condition == after.condition ? after.condition.rawValue
                                                                               : "\(before.condition.rawValue)->\(after.condition.rawValue)")]
            if replaced { fields.append(Event.Field("device", "\(before.name)->\(after.name)")) }
            if was != index {
                fields.append(Event.Field("moved-from", "\(was)"))
                if !replaced { fields.append(Event.Field("device", after.name)) }
            }
            if after.condition == .degraded || after.condition == .missing {
                fields.append(Event.Field("cause", after.cause.word))
                if after.errno != 0 { fields.append(Event.Field("errno", errnoName(after.errno))) }
            }
            publish("change", "leg", fields)
        }
    }

    /// `resync started|progress|finished`, or `scrub ...` with the scrub's `action:check|repair`.
    private func publishPass(_ action: RegionPass.Action, _ object: String, _ fields: [Event.Field]) {
        switch action {
        case .resync: publish("resync", object, fields)
        case .scrub(let scrub): publish("scrub", object, [Event.Field("action", scrub.rawValue)] + fields)
        }
    }

    func passStarted(_ action: RegionPass.Action, reason: String, regions: Int, bytes: UInt64) {
        publishPass(action, "started", [Event.Field("reason", reason), Event.Field("regions", "\(regions)"),
                                        Event.Field("bytes", "\(bytes)")])
    }

    func passProgress(_ action: RegionPass.Action, percent: Int, regionsDone: Int, regions: Int) {
        publishPass(action, "progress", [Event.Field("percent", "\(percent)"), Event.Field("regions-done", "\(regionsDone)"),
                                         Event.Field("regions", "\(regions)")])
    }

    func passFinished(_ action: RegionPass.Action, outcome: String, regionsDone: Int, regions: Int,
                      findings: RegionPass.Findings?) {
        var fields = [Event.Field("result", outcome), Event.Field("regions-done", "\(regionsDone)"),
                      Event.Field("regions", "\(regions)")]
        if let findings {
            fields += [Event.Field("mismatched-regions", "\(findings.mismatchedRegions)"),
                       Event.Field("mismatched-bytes", "\(findings.mismatchedBytes)"),
                       Event.Field("repaired-regions", "\(findings.repairedRegions)"),
                       Event.Field("unresolved-regions", "\(findings.unresolvedRegions)"),
                       Event.Field("read-errors-repaired", "\(findings.readErrorsRepaired)")]
        }
        publishPass(action, "finished", fields)
    }

    /// `scrub mismatch region:R offset:O bytes:B vote:majority winner:0 outvoted:2 repaired:yes`
    func scrubMismatch(region: Int, offset: UInt64, bytes: Int, vote: Vote, repaired: Bool) {
        let (kind, winner) = switch vote {
        case .majority(let winner, _): ("majority", "\(winner)")
        case .firstOfTwo(let winner, _): ("first-of-two", "\(winner)")
        case .none, .agree: ("none", "-")
        }
        publish("scrub", "mismatch", [Event.Field("region", "\(region)"), Event.Field("offset", "\(offset)"),
                                      Event.Field("bytes", "\(bytes)"), Event.Field("vote", kind),
                                      Event.Field("winner", winner),
                                      Event.Field("outvoted", vote.outvoted.isEmpty ? "-" : vote.outvoted.map(String.init).joined(separator: ",")),
                                      Event.Field("repaired", repaired ? "yes" : "no")])
    }

    /// `scrub read-error leg:1 region:R errno:EIO repaired:yes`
    func scrubReadError(leg: Int, region: Int, errno: Int32, repaired: Bool) {
        publish("scrub", "read-error", [Event.Field("leg", "\(leg)"), Event.Field("region", "\(region)"),
                                        Event.Field("errno", errnoName(errno)), Event.Field("repaired", repaired ? "yes" : "no")])
    }

    /// `reconnect leg leg:1 device:URI result:refused reason:...`: a remote
    /// leg's server answers again, with something not taken back.
    func reconnectRefused(leg: Int, device: String, reason: String) {
        publish("reconnect", "leg", [Event.Field("leg", "\(leg)"), Event.Field("device", device),
                                     Event.Field("result", "refused"), Event.Field("reason", reason)])
    }

    /// `ownership lost owner:HOST-UUID`: another server took the legs over.
    func ownershipLost(owner: MirrorOwner?) {
        publish("ownership", "lost", [Event.Field("owner", owner.map { "\($0.host)" } ?? "-")])
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
