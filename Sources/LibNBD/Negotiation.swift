internal import CLibNBD

// The handshake and metadata parts of libnbd's API: what tests use to
// examine a server, option by option.

/// One extent of a block status reply.
public struct NBDExtent: Sendable, Hashable {
    public let length: UInt32
    public let flags: UInt32

    public init(length: UInt32, flags: UInt32) {
        self.length = length
        self.flags = flags
    }
}

/// Collects what libnbd's C callbacks report, through their user_data.
private final class Collector<T> {
    var items: [T] = []
}

extension NBDHandle {
    /// Stops after the handshake's option phase, so that options can be
    /// sent one by one (`optInfo`, `optList`, `optGo`...).
    public func setOptionMode(_ enabled: Bool) throws(NBDError) {
        try check(nbd_set_opt_mode(raw, enabled))
    }

    /// Whether to ask for structured replies (the default) or not.
    public func setRequestStructuredReplies(_ request: Bool) throws(NBDError) {
        try check(nbd_set_request_structured_replies(raw, request))
    }

    public func structuredRepliesNegotiated() throws(NBDError) -> Bool {
        try flag(nbd_get_structured_replies_negotiated(raw))
    }

    /// Turns off libnbd's own checks of requests (alignment, bounds, flags),
    /// so that a test can send what a careless client would.
    public func setStrictMode(_ flags: UInt32) throws(NBDError) {
        try check(nbd_set_strict_mode(raw, flags))
    }

    public func setExportName(_ name: String) throws(NBDError) {
        try check(nbd_set_export_name(raw, name))
    }

    /// Asks for the export's name and description in NBD_OPT_GO/INFO.
    public func setFullInfo(_ enabled: Bool) throws(NBDError) {
        try check(nbd_set_full_info(raw, enabled))
    }

    public func addMetaContext(_ name: String) throws(NBDError) {
        try check(nbd_add_meta_context(raw, name))
    }

    public func canMetaContext(_ name: String) throws(NBDError) -> Bool {
        try flag(nbd_can_meta_context(raw, name))
    }

    public func exportDescription() throws(NBDError) -> String {
        guard let text = nbd_get_export_description(raw) else { throw NBDError.last() }
        defer { free(text) }
        return String(cString: text)
    }

    public func canonicalExportName() throws(NBDError) -> String {
        guard let text = nbd_get_canonical_export_name(raw) else { throw NBDError.last() }
        defer { free(text) }
        return String(cString: text)
    }

    public func optGo() throws(NBDError) { try check(nbd_opt_go(raw)) }
    public func optInfo() throws(NBDError) { try check(nbd_opt_info(raw)) }
    public func optAbort() throws(NBDError) { try check(nbd_opt_abort(raw)) }

    /// NBD_OPT_LIST: the exports' names and descriptions.
    public func optList() throws(NBDError) -> [(name: String, description: String)] {
        let collector = Collector<(name: String, description: String)>()
        let callback = nbd_list_callback(
            callback: { userData, name, description in
                let collector = Unmanaged<Collector<(name: String, description: String)>>
                    .fromOpaque(userData!).takeUnretainedValue()
                collector.items.append((String(cString: name!), String(cString: description!)))
                return 0
            },
            user_data: Unmanaged.passUnretained(collector).toOpaque(), free: nil)
        let count = nbd_opt_list(raw, callback)
        if count < 0 { throw NBDError.last() }
        return collector.items
    }

    /// NBD_OPT_LIST_META_CONTEXT with the queries added by `addMetaContext`
    /// (all contexts when none were added).
    public func optListMetaContext() throws(NBDError) -> [String] {
        let collector = Collector<String>()
        let callback = nbd_context_callback(
            callback: { userData, name in
                Unmanaged<Collector<String>>.fromOpaque(userData!).takeUnretainedValue()
                    .items.append(String(cString: name!))
                return 0
            },
            user_data: Unmanaged.passUnretained(collector).toOpaque(), free: nil)
        if nbd_opt_list_meta_context(raw, callback) < 0 { throw NBDError.last() }
        return collector.items
    }

    /// NBD_CMD_BLOCK_STATUS: the extents of each selected meta context.
    public func blockStatus(count: UInt64, offset: UInt64,
                            flags: NBDCommandFlags = []) throws(NBDError) -> [String: [NBDExtent]] {
        let collector = Collector<(String, [NBDExtent])>()
        let callback = nbd_extent_callback(
            callback: { userData, context, _, entries, count, _ in
                var extents: [NBDExtent] = []
                for index in stride(from: 0, to: count, by: 2) {
                    extents.append(NBDExtent(length: entries![index], flags: entries![index + 1]))
                }
                Unmanaged<Collector<(String, [NBDExtent])>>.fromOpaque(userData!).takeUnretainedValue()
                    .items.append((String(cString: context!), extents))
                return 0
            },
            user_data: Unmanaged.passUnretained(collector).toOpaque(), free: nil)
        try withExtendedLifetime(collector) { () throws(NBDError) in
            try check(nbd_block_status(raw, count, offset, callback, flags.rawValue))
        }
        return Dictionary(collector.items, uniquingKeysWith: { first, _ in first })
    }
}
