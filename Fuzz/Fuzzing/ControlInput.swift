import ControlProtocol

/// A line on the control socket (mode 0600: root's, or the server's
/// user's), as the server reads it: at most 1 MiB, up to its newline.
enum ControlInput {
    static func request(_ bytes: UnsafeRawBufferPointer) {
        let line = String(decoding: bytes.prefix(1 << 20).prefix { $0 != UInt8(ascii: "\n") }, as: UTF8.self)
        guard let request = ControlRequest.parse(line) else { return }
        // What the server relies on once a request is parsed.
        switch request.command {
        case .failLeg, .readdLeg, .removeLeg: precondition(request.leg != nil)
        case .replaceLeg: precondition(request.leg != nil && request.device != nil)
        case .addLeg: precondition(request.device != nil)
        case .setLeg: precondition(request.leg != nil && request.writeMostly != nil)
        case .status, .events, .check, .repair, .cancelScrub: break
        }
    }
}
