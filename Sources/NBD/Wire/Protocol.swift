// The NBD protocol's numbers, from NetworkBlockDevice/nbd doc/proto.md.
// All are sent big-endian.

/// Magic numbers that start each message.
enum Magic {
    /// "NBDMAGIC": the server's first eight bytes.
    static let greeting: UInt64 = 0x4e42_444d_4147_4943
    /// "IHAVEOPT": after the greeting, and before every client option.
    static let option: UInt64 = 0x4948_4156_454F_5054
    /// Before every option reply.
    static let optionReply: UInt64 = 0x3_e889_0455_65a9
    static let request: UInt32 = 0x2560_9513
    static let simpleReply: UInt32 = 0x6744_6698
    static let structuredReply: UInt32 = 0x668e_33ef
}

/// Handshake flags (server, 16 bits) and client flags (32 bits).
enum HandshakeFlag {
    static let fixedNewstyle: UInt16 = 1 << 0
    static let noZeroes: UInt16 = 1 << 1
    static let clientFixedNewstyle: UInt32 = 1 << 0
    static let clientNoZeroes: UInt32 = 1 << 1
}

/// Transmission flags: what the export supports.
public struct TransmissionFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = TransmissionFlags(rawValue: 1 << 0)
    public static let readOnly = TransmissionFlags(rawValue: 1 << 1)
    public static let sendFlush = TransmissionFlags(rawValue: 1 << 2)
    public static let sendFUA = TransmissionFlags(rawValue: 1 << 3)
    public static let rotational = TransmissionFlags(rawValue: 1 << 4)
    public static let sendTrim = TransmissionFlags(rawValue: 1 << 5)
    public static let sendWriteZeroes = TransmissionFlags(rawValue: 1 << 6)
    public static let sendDF = TransmissionFlags(rawValue: 1 << 7)
    public static let canMultiConn = TransmissionFlags(rawValue: 1 << 8)
    public static let sendCache = TransmissionFlags(rawValue: 1 << 10)
    public static let sendFastZero = TransmissionFlags(rawValue: 1 << 11)
}

/// Client options during the handshake.
enum OptionCode: UInt32 {
    case exportName = 1
    case abort = 2
    case list = 3
    case startTLS = 5
    case info = 6
    case go = 7
    case structuredReply = 8
    case listMetaContext = 9
    case setMetaContext = 10
}

/// Option reply types; errors have bit 31 set.
enum OptionReply: UInt32 {
    case ack = 1
    case server = 2
    case info = 3
    case metaContext = 4
    case errUnsupported = 0x8000_0001
    case errPolicy = 0x8000_0002
    case errInvalid = 0x8000_0003
    case errPlatform = 0x8000_0004
    case errTLSRequired = 0x8000_0005
    case errUnknown = 0x8000_0006
    case errShutdown = 0x8000_0007
    case errBlockSizeRequired = 0x8000_0008
    case errTooBig = 0x8000_0009
}

/// Information types in NBD_REP_INFO.
enum InfoType: UInt16 {
    case export = 0
    case name = 1
    case description = 2
    case blockSize = 3
}

/// Transmission commands.
enum CommandType: UInt16 {
    case read = 0
    case write = 1
    case disconnect = 2
    case flush = 3
    case trim = 4
    case cache = 5
    case writeZeroes = 6
    case blockStatus = 7

    /// Whether the command changes the export's bytes: refused on a
    /// read-only export.
    var changesData: Bool {
        switch self {
        case .write, .trim, .writeZeroes: true
        case .read, .disconnect, .flush, .cache, .blockStatus: false
        }
    }
}

/// Command flags.
struct CommandFlags: OptionSet, Hashable {
    let rawValue: UInt16
    static let fua = CommandFlags(rawValue: 1 << 0)
    static let noHole = CommandFlags(rawValue: 1 << 1)
    static let dontFragment = CommandFlags(rawValue: 1 << 2)
    static let reqOne = CommandFlags(rawValue: 1 << 3)
    static let fastZero = CommandFlags(rawValue: 1 << 4)
}

/// Structured reply chunk types and flags.
enum ChunkType: UInt16 {
    case none = 0
    case offsetData = 1
    case offsetHole = 2
    case blockStatus = 5
    case error = 0x8001
    case errorOffset = 0x8002
}

enum ChunkFlag {
    static let done: UInt16 = 1 << 0
}

/// The error values a reply may carry (proto.md, "Error values").
public enum NBDErrorCode: UInt32, Sendable {
    case perm = 1
    case io = 5
    case noMemory = 12
    case invalid = 22
    case noSpace = 28
    case overflow = 75
    case notSupported = 95
    case shutdown = 108
}

/// Sizes the protocol fixes.
enum WireSize {
    static let requestHeader = 28
    static let simpleReplyHeader = 16
    static let structuredReplyHeader = 20
    static let optionHeader = 16
    /// Strings (export names, messages) may be no longer than this.
    static let maxString = 4096
}
