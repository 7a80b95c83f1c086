/// One thing that happened to a mirror or its server, in the shape of
/// drbdsetup's events2: a verb, an object, then `key:value` fields, as
/// `dmio-nbd events` prints it:
/// `change leg mirror:6f1c… leg:1 state:in_sync->degraded errno:ENOSPC`.
public struct Event: Sendable, Hashable, Codable {
    /// `exists` (the state when a watcher starts), `change`, `resync`,
    /// `metadata`, `connection`.
    public var verb: String
    /// What it is about (`mirror`, `leg`), or what happened (`started`, `written`, `opened`).
    public var object: String
    public var fields: [Field]

    public struct Field: Sendable, Hashable, Codable {
        public var key: String
        public var value: String

        public init(_ key: String, _ value: String) {
            self.key = key
            self.value = value
        }
    }

    public init(_ verb: String, _ object: String, _ fields: [Field]) {
        self.verb = verb
        self.object = object
        self.fields = fields
    }

    /// The value of field `key`, if there is one.
    public subscript(key: String) -> String? { fields.first { $0.key == key }?.value }

    /// The line `dmio-nbd events` prints. Values never hold spaces (a device
    /// path with one has it escaped as `\x20`), so a line splits on them.
    public var line: String {
        ([verb, object] + fields.map { "\($0.key):\(Self.escaped($0.value))" }).joined(separator: " ")
    }

    private static func escaped(_ value: String) -> String {
        var out = ""
        for scalar in value.unicodeScalars {
            switch scalar {
            case " ": out += "\\x20"
            case "\\": out += "\\\\"
            case "\n": out += "\\x0a"
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out
    }
}

/// Where a mirror and the server say what changed: passed to them at
/// construction (a mirror without one says nothing).
public protocol EventSink: Sendable {
    /// Takes `event` and returns at once: it never waits for a watcher or a
    /// program, and takes only locks that are never held while waiting (a
    /// leg table calls it under its own lock, so that changes arrive in
    /// order).
    func publish(_ event: Event)
}
