/// Whether a server offers TLS, and whether a client must take it before
/// anything else (nbdkit's and qemu-nbd's --tls=off|on|require).
public enum TLSPolicy: String, Sendable, CaseIterable {
    case off
    /// Offered; a client may also go on without it.
    case on
    /// Every option but NBD_OPT_STARTTLS and NBD_OPT_ABORT is refused until
    /// TLS is running.
    case require
}

/// The handshake's decisions (the fixed newstyle negotiation, proto.md):
/// what each client message is answered with, what is remembered for the
/// transmission phase, and the TLS rules. The handler feeds it what the
/// option decoder framed and carries out the action; it is tested without
/// a channel.
struct HandshakeStateMachine {
    /// What an option is answered with; the handler encodes it.
    enum Answer {
        case ack
        case error(OptionReply, String)
        /// NBD_OPT_LIST: one NBD_REP_SERVER each, then the ACK.
        case exports([Export])
        /// NBD_OPT_INFO and NBD_OPT_GO: the export's information, then the ACK.
        case info(Session, requests: Set<UInt16>)
        /// The meta contexts found (ids of 0 when listing), then the ACK.
        case metaContexts([MetaContext], listing: Bool)
    }

    /// How the client entered the transmission phase, which says how it
    /// is answered.
    enum Entry {
        case go(code: UInt32, requests: Set<UInt16>)
        case exportName(zeroes: Bool)
    }

    enum Action {
        /// Nothing to send (client flags taken, or the handshake is over).
        case none
        case answer(code: UInt32, Answer)
        /// Answer, then close: NBD_OPT_ABORT.
        case answerAndClose(code: UInt32, Answer)
        /// Close without an answer, as the spec asks for this input; the
        /// reason is for the log.
        case close(String)
        /// Acknowledge NBD_OPT_STARTTLS in plaintext, then run TLS; bytes the
        /// client sent after the option, before the acknowledgement, were
        /// not encrypted by it and are dropped.
        case startTLS(code: UInt32)
        /// Answer as `entry` says, then hand the connection to the
        /// transmission phase.
        case enterTransmission(Session, Entry)
    }

    private enum TLSState {
        case notOffered
        case offered(required: Bool)
        case running
    }

    private let exports: [Export]
    private var tls: TLSState
    private var noZeroes = false
    private var structuredReplies = false
    /// Set by NBD_OPT_SET_META_CONTEXT, for the export it named.
    private var metaContexts: (export: String, contexts: [MetaContext])?
    /// Closed, or handed to the transmission phase: nothing more is answered.
    private var finished = false

    init(exports: [Export], tls: TLSPolicy) {
        self.exports = exports
        switch tls {
        case .off: self.tls = .notOffered
        case .on: self.tls = .offered(required: false)
        case .require: self.tls = .offered(required: true)
        }
    }

    /// Whether a client that asks for nothing but TLS yet is refused.
    private var tlsRequiredFirst: Bool {
        if case .offered(required: true) = tls { return true }
        return false
    }

    mutating func receive(clientFlags flags: UInt32) -> Action {
        let known = HandshakeFlag.clientFixedNewstyle | HandshakeFlag.clientNoZeroes
        // The spec: a server MUST drop the connection on unknown flags.
        guard flags & ~known == 0 else { return finish(.close("\(NBDProtocolError.unknownClientFlags(flags))")) }
        noZeroes = flags & HandshakeFlag.clientNoZeroes != 0
        return .none
    }

    /// The server's policy for each option.
    mutating func receive(_ option: ClientOption) -> Action {
        guard !finished else { return .none }
        let code = option.code
        if tlsRequiredFirst && code != OptionCode.startTLS.rawValue && code != OptionCode.abort.rawValue {
            // NBD_OPT_EXPORT_NAME cannot carry an error: the spec says to drop the connection.
            if case .exportName = option { return finish(.close("NBD_OPT_EXPORT_NAME before TLS, which this server requires")) }
            return .answer(code: code, .error(.errTLSRequired, "this server requires TLS: use NBD_OPT_STARTTLS first"))
        }
        switch option {
        case .exportName(let name):
            guard let export = export(named: name) else {
                return finish(.close("unknown export \"\(name)\" asked by NBD_OPT_EXPORT_NAME"))
            }
            return finish(.enterTransmission(session(export, name), .exportName(zeroes: !noZeroes)))
        case .abort:
            return finish(.answerAndClose(code: code, .ack))
        case .list:
            return .answer(code: code, .exports(exports))
        case .startTLS:
            return startTLS(code)
        case .info(let request):
            return info(code, request, thenGo: false)
        case .go(let request):
            return info(code, request, thenGo: true)
        case .structuredReply:
            structuredReplies = true
            return .answer(code: code, .ack)
        case .listMetaContext(let request):
            return metaContext(code, request, listing: true)
        case .setMetaContext(let request):
            return metaContext(code, request, listing: false)
        case .unknown:
            return .answer(code: code, .error(.errUnsupported, "unknown option \(code)"))
        case .malformed(_, let why):
            let isMetaContext = code == OptionCode.listMetaContext.rawValue || code == OptionCode.setMetaContext.rawValue
            if isMetaContext && !structuredReplies { return needStructuredReplies(code) }
            // A failed NBD_OPT_SET_META_CONTEXT leaves no context selected.
            if code == OptionCode.setMetaContext.rawValue { metaContexts = nil }
            return .answer(code: code, .error(.errInvalid, why))
        case .tooBig:
            return .answer(code: code, .error(.errTooBig, "option data too large"))
        }
    }

    private mutating func finish(_ action: Action) -> Action {
        finished = true
        return action
    }

    private mutating func startTLS(_ code: UInt32) -> Action {
        switch tls {
        case .notOffered:
            return .answer(code: code, .error(.errPolicy, "TLS is not enabled on this server"))
        case .running:
            return .answer(code: code, .error(.errInvalid, "TLS is already running"))
        case .offered:
            tls = .running
            // The spec: what was negotiated in plaintext is forgotten, so that
            // nothing a man in the middle sent before TLS outlives it.
            structuredReplies = false
            metaContexts = nil
            return .startTLS(code: code)
        }
    }

    private func export(named name: String) -> Export? {
        if name.isEmpty { return exports.first }
        return exports.first { $0.name == name }
    }

    private func session(_ export: Export, _ name: String) -> Session {
        Session(export: export, structuredReplies: structuredReplies, metaContexts: selectedContexts(for: name))
    }

    /// NBD_OPT_INFO, or with `thenGo` NBD_OPT_GO.
    private mutating func info(_ code: UInt32, _ request: ClientOption.ExportRequest, thenGo: Bool) -> Action {
        guard let export = export(named: request.name) else {
            return .answer(code: code, .error(.errUnknown, "no export named \"\(request.name)\""))
        }
        let session = session(export, request.name)
        guard thenGo else { return .answer(code: code, .info(session, requests: request.requests)) }
        return finish(.enterTransmission(session, .go(code: code, requests: request.requests)))
    }

    private mutating func metaContext(_ code: UInt32, _ request: ClientOption.MetaContextRequest,
                                      listing: Bool) -> Action {
        guard structuredReplies else { return needStructuredReplies(code) }
        guard let export = export(named: request.export) else {
            if !listing { metaContexts = nil }
            return .answer(code: code, .error(.errUnknown, "no export named \"\(request.export)\""))
        }
        let available = export.metaContexts
        var found: [MetaContext] = []
        if listing && request.queries.isEmpty {
            found = available
        } else {
            for query in request.queries {
                for match in MetaContext.matching(query, listing: listing, in: available) where !found.contains(match) {
                    found.append(match)
                }
            }
        }
        if !listing { metaContexts = (request.export, found) }
        return .answer(code: code, .metaContexts(found, listing: listing))
    }

    private func needStructuredReplies(_ code: UInt32) -> Action {
        .answer(code: code, .error(.errInvalid, "meta contexts need NBD_OPT_STRUCTURED_REPLY first"))
    }

    /// The contexts the last NBD_OPT_SET_META_CONTEXT chose, if it named
    /// the export being entered.
    private func selectedContexts(for name: String) -> [MetaContext] {
        guard let metaContexts, metaContexts.export == name else { return [] }
        return metaContexts.contexts
    }
}
