import BlockTargets

/// One export: a target under a name.
public struct Export: Sendable {
    /// The name clients ask for; the empty name always reaches the default
    /// (first) export too.
    public var name: String
    public var description: String?
    /// Serve reads only, whatever the target could do.
    public var readOnly: Bool
    public let target: BlockTarget

    public init(name: String = "", description: String? = nil, readOnly: Bool = false, target: BlockTarget) {
        self.name = name
        self.description = description
        self.readOnly = readOnly
        self.target = target
    }

    var isReadOnly: Bool { readOnly || target.capabilities.contains(.readOnly) }

    /// The transmission flags that tell the truth about this export.
    func transmissionFlags(structuredReplies: Bool) -> TransmissionFlags {
        let capabilities = target.capabilities
        var flags: TransmissionFlags = [.hasFlags]
        if isReadOnly { flags.insert(.readOnly) }
        if capabilities.contains(.flush) { flags.insert(.sendFlush) }
        if capabilities.contains(.fua) { flags.insert(.sendFUA) }
        if capabilities.contains(.trim) && !isReadOnly { flags.insert(.sendTrim) }
        if capabilities.contains(.writeZeroes) && !isReadOnly {
            flags.insert(.sendWriteZeroes)
            // Fast-zero requests are answered honestly (ENOTSUP when zeroing
            // would not be faster), so the flag may always go with zeroing.
            flags.insert(.sendFastZero)
        }
        if capabilities.contains(.cache) { flags.insert(.sendCache) }
        if capabilities.contains(.multiConnection) { flags.insert(.canMultiConn) }
        if structuredReplies { flags.insert(.sendDF) }
        return flags
    }
}

extension Export {
    /// The meta contexts this export offers for block status:
    /// base:allocation, then the target's own; ids count from 1.
    var metaContexts: [MetaContext] {
        ([MetaContext.baseAllocation] + target.metaContexts).enumerated().map {
            MetaContext(name: $0.element, id: UInt32($0.offset + 1))
        }
    }
}

/// A meta context a client may select for block status, and the id its
/// replies carry.
struct MetaContext: Hashable {
    static let baseAllocation = "base:allocation"

    let name: String
    let id: UInt32

    var isBaseAllocation: Bool { name == Self.baseAllocation }

    /// The contexts of `available` that a query names: "ns:" is a wildcard
    /// for the namespace when listing; unknown namespaces and leaves select
    /// nothing.
    static func matching(_ query: String, listing: Bool, in available: [MetaContext]) -> [MetaContext] {
        if listing, let colon = query.firstIndex(of: ":"), query.index(after: colon) == query.endIndex {
            return available.filter { $0.name.hasPrefix(query) }
        }
        return available.filter { $0.name == query }
    }
}
