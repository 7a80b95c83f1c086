import NIOCore

/// One option of the handshake, decoded: what the client asks, or why it
/// cannot be answered as asked. The handshake handler decides what to do
/// with it; nothing here knows the exports.
enum ClientOption: Equatable {
    /// NBD_OPT_EXPORT_NAME: enter transmission on this export, or be dropped.
    case exportName(String)
    case go(ExportRequest)
    case info(ExportRequest)
    case list
    case listMetaContext(MetaContextRequest)
    case setMetaContext(MetaContextRequest)
    case startTLS
    case structuredReply
    case abort
    /// An option this server does not know.
    case unknown(code: UInt32)
    /// A known option whose data does not parse, and why.
    case malformed(code: UInt32, why: String)
    /// Data longer than any option this server takes (skipped unread).
    case tooBig(code: UInt32)

    /// NBD_OPT_INFO or NBD_OPT_GO: an export, and the information asked for.
    struct ExportRequest: Equatable {
        var name: String
        var requests: Set<UInt16>
    }

    /// NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT.
    struct MetaContextRequest: Equatable {
        var export: String
        var queries: [String]
    }

    /// The option's number, which its replies carry.
    var code: UInt32 {
        switch self {
        case .exportName: OptionCode.exportName.rawValue
        case .go: OptionCode.go.rawValue
        case .info: OptionCode.info.rawValue
        case .list: OptionCode.list.rawValue
        case .listMetaContext: OptionCode.listMetaContext.rawValue
        case .setMetaContext: OptionCode.setMetaContext.rawValue
        case .startTLS: OptionCode.startTLS.rawValue
        case .structuredReply: OptionCode.structuredReply.rawValue
        case .abort: OptionCode.abort.rawValue
        case .unknown(let code), .malformed(let code, _), .tooBig(let code): code
        }
    }

    /// Decodes option `code` with its `data` (all of it, as framed).
    init(code: UInt32, data: ByteBuffer) {
        guard let known = OptionCode(rawValue: code) else {
            self = .unknown(code: code)
            return
        }
        func noData(_ option: ClientOption, _ name: String) -> ClientOption {
            data.readableBytes == 0 ? option : .malformed(code: code, why: "\(name) takes no data")
        }
        switch known {
        case .exportName:
            self = .exportName(data.getString(at: data.readerIndex, length: data.readableBytes) ?? "")
        case .abort:
            // The spec lets ABORT carry data, and asks the server to ignore it.
            self = .abort
        case .list:
            self = noData(.list, "NBD_OPT_LIST")
        case .startTLS:
            self = noData(.startTLS, "NBD_OPT_STARTTLS")
        case .structuredReply:
            self = noData(.structuredReply, "NBD_OPT_STRUCTURED_REPLY")
        case .info, .go:
            guard let request = Self.exportRequest(data) else {
                self = .malformed(code: code, why: "malformed \(known == .go ? "NBD_OPT_GO" : "NBD_OPT_INFO") data")
                return
            }
            self = known == .go ? .go(request) : .info(request)
        case .listMetaContext, .setMetaContext:
            guard let request = Self.metaContextRequest(data) else {
                self = .malformed(code: code, why: "malformed meta context request")
                return
            }
            self = known == .listMetaContext ? .listMetaContext(request) : .setMetaContext(request)
        }
    }

    /// Name length, name, count of information requests, the requests.
    private static func exportRequest(_ data: ByteBuffer) -> ExportRequest? {
        var data = data
        guard let nameLength = data.readInteger(as: UInt32.self), nameLength <= data.readableBytes - 2,
              let name = data.readString(length: Int(nameLength)),
              let requestCount = data.readInteger(as: UInt16.self),
              data.readableBytes == Int(requestCount) * 2 else { return nil }
        var requests: Set<UInt16> = []
        for _ in 0..<requestCount { requests.insert(data.readInteger(as: UInt16.self)!) }
        return ExportRequest(name: name, requests: requests)
    }

    /// Export name length and name, query count, then each query's length
    /// and text; nil when a length points past the data or bytes are left.
    private static func metaContextRequest(_ data: ByteBuffer) -> MetaContextRequest? {
        var data = data
        guard let nameLength = data.readInteger(as: UInt32.self), nameLength <= data.readableBytes,
              let name = data.readString(length: Int(nameLength)),
              let count = data.readInteger(as: UInt32.self) else { return nil }
        var queries: [String] = []
        for _ in 0..<count {
            guard let length = data.readInteger(as: UInt32.self), length <= data.readableBytes,
                  let query = data.readString(length: Int(length)) else { return nil }
            queries.append(query)
        }
        return data.readableBytes == 0 ? MetaContextRequest(export: name, queries: queries) : nil
    }
}
