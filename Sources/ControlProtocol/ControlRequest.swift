import FoundationEssentials

/// The control socket's protocol: a client connects, sends one request as
/// one line of JSON, and reads one answer, a JSON object, until the server
/// closes. Client and server are the same program; the JSON output of the
/// commands (`--json`) is documented in the README.
public struct ControlRequest: Codable, Equatable, Sendable {
    public enum Command: String, Codable, Sendable {
        case status, failLeg = "fail-leg", readdLeg = "readd-leg", replaceLeg = "replace-leg", events
        case addLeg = "add-leg", removeLeg = "remove-leg", setLeg = "set-leg"
        case check, repair, cancelScrub = "cancel-scrub"
    }

    public var command: Command
    public var leg: Int?
    /// replace-leg, add-leg: the new device, as an absolute path or a URI.
    public var device: String?
    /// replace-leg, add-leg: overwrite what the device holds.
    public var force: Bool?
    /// events: the mirror as it is first (`exists` events).
    public var now: Bool?
    /// set-leg: whether the leg is write-mostly.
    public var writeMostly: Bool?

    /// The request in `line`, or nil when it is not one.
    public init(command: Command, leg: Int? = nil, device: String? = nil, force: Bool? = nil, now: Bool? = nil,
                writeMostly: Bool? = nil) {
        self.command = command
        self.leg = leg
        self.device = device
        self.force = force
        self.now = now
        self.writeMostly = writeMostly
    }

    public static func parse(_ line: String) -> ControlRequest? {
        guard let request = try? JSONDecoder().decode(ControlRequest.self, from: Data(line.utf8)) else { return nil }
        switch request.command {
        case .status, .events, .check, .repair, .cancelScrub: return request
        case .failLeg, .readdLeg, .removeLeg: return request.leg == nil ? nil : request
        case .replaceLeg: return request.leg == nil || request.device == nil ? nil : request
        case .addLeg: return request.device == nil ? nil : request
        case .setLeg: return request.leg == nil || request.writeMostly == nil ? nil : request
        }
    }
}

extension ControlRequest: CustomStringConvertible {
    /// "replace-leg 1 /srv/c.img --force", for the log.
    public var description: String {
        let writeMostly = writeMostly.map { $0 ? "--write-mostly" : "--no-write-mostly" }
        return ([command.rawValue] + [leg.map { "\($0)" }, device, force == true ? "--force" : nil, writeMostly].compactMap { $0 })
            .joined(separator: " ")
    }
}
