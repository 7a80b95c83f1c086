import NIOCore

/// A request that passed every check, ready to run.
enum Command {
    case read(offset: UInt64, length: UInt32)
    case write(offset: UInt64, payload: WritePayload, fua: Bool)
    case flush
    case trim(offset: UInt64, length: UInt32, fua: Bool)
    case writeZeroes(offset: UInt64, length: UInt32, mayUnmap: Bool, fua: Bool)
    case cache(offset: UInt64, length: UInt32)
    case blockStatus(offset: UInt64, length: UInt32, onlyOne: Bool)
    case disconnect
    /// A zero-length request: nothing to do, success (the spec leaves it
    /// unspecified; nbdkit and qemu-nbd succeed too). `isRead`: the reply
    /// must then be structured, if structured replies were negotiated.
    case nothing(isRead: Bool)
}

/// Why a request is refused, in the reply's terms.
struct Rejection: Error {
    let error: NBDErrorCode
    let message: String
}

/// Every check of a transmission request, in one place: command and flags
/// known and allowed, export writable, range inside the export and aligned.
/// What it returns may run without further checks.
func validate(_ request: consuming NBDRequest, session: Session) -> Result<Command, Rejection> {
    let flags = CommandFlags(rawValue: request.flags)
    let exportFlags = session.flags
    let target = session.export.target
    guard let type = CommandType(rawValue: request.type) else {
        return .failure(Rejection(error: .invalid, message: "unknown command \(request.type)"))
    }

    // Flags each command may carry. FUA is accepted on every command when
    // advertised, as the spec requires.
    var allowed: CommandFlags = exportFlags.contains(.sendFUA) ? [.fua] : []
    switch type {
    case .read where session.structuredReplies: allowed.insert(.dontFragment)
    case .writeZeroes: allowed.formUnion([.noHole, .fastZero])
    case .blockStatus: allowed.insert(.reqOne)
    default: break
    }
    guard flags.isSubset(of: allowed) else {
        return .failure(Rejection(error: .invalid,
                                  message: "flags 0x\(String(request.flags, radix: 16)) not valid for \(type)"))
    }

    if type.changesData && exportFlags.contains(.readOnly) {
        return .failure(Rejection(error: .perm, message: "the export is read-only"))
    }
    switch type {
    case .trim where !exportFlags.contains(.sendTrim),
         .writeZeroes where !exportFlags.contains(.sendWriteZeroes),
         .flush where !exportFlags.contains(.sendFlush),
         .cache where !exportFlags.contains(.sendCache):
        return .failure(Rejection(error: .invalid, message: "\(type) is not supported by this export"))
    case .blockStatus where session.metaContexts.isEmpty:
        return .failure(Rejection(error: .invalid, message: "block status needs a meta context chosen in the handshake"))
    case .disconnect:
        return .success(.disconnect)
    case .flush:
        return .success(.flush)
    default:
        break
    }

    let offset = request.offset
    let length = request.length
    let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
    if overflow || end > target.size {
        // The spec asks for ENOSPC for writes past the end, EINVAL otherwise.
        let error: NBDErrorCode = type == .write || type == .writeZeroes ? .noSpace : .invalid
        return .failure(Rejection(error: error,
                                  message: "\(length) bytes at \(offset) reach past the export's end (\(target.size))"))
    }
    let minimum = UInt64(target.blockSizes.minimum)
    if offset % minimum != 0 || UInt64(length) % minimum != 0 {
        return .failure(Rejection(error: .invalid,
                                  message: "\(length) bytes at \(offset) are not aligned to \(minimum)-byte blocks"))
    }
    if type == .read && length > target.blockSizes.maximumPayload {
        return .failure(Rejection(error: .invalid,
                                  message: "a read of \(length) bytes is over the \(target.blockSizes.maximumPayload)-byte limit"))
    }
    if flags.contains(.fastZero) && (!target.capabilities.contains(.fastZero) || flags.contains(.noHole)) {
        return .failure(Rejection(error: .notSupported, message: "zeroing here is no faster than writing"))
    }
    if length == 0 && type != .blockStatus { return .success(.nothing(isRead: type == .read)) }

    let fua = flags.contains(.fua)
    switch type {
    case .read:
        return .success(.read(offset: offset, length: length))
    case .write:
        // Moved, not copied: the payload's buffers are counted references.
        return .success(.write(offset: offset, payload: request.payload.take()!, fua: fua))
    case .trim:
        return .success(.trim(offset: offset, length: length, fua: fua))
    case .writeZeroes:
        return .success(.writeZeroes(offset: offset, length: length, mayUnmap: !flags.contains(.noHole), fua: fua))
    case .cache:
        return .success(.cache(offset: offset, length: length))
    case .blockStatus:
        guard length > 0 else { return .failure(Rejection(error: .invalid, message: "block status of 0 bytes")) }
        return .success(.blockStatus(offset: offset, length: length, onlyOne: flags.contains(.reqOne)))
    case .disconnect, .flush:
        preconditionFailure("answered above")
    }
}
