import BlockTargets
import Glibc

/// The one place where a system error becomes an NBD error, as the spec and
/// nbdkit have it: the NBD error set is small, and two of its errors are
/// only for the requests that ask for them (ENOTSUP for a FAST_ZERO
/// request, EOVERFLOW for a DF read); elsewhere those causes are EINVAL.
/// The real cause goes to the client as the message of a structured error
/// reply; the caller logs it.
func nbdError(for result: TargetResult, flags: CommandFlags) -> Rejection {
    let code: NBDErrorCode
    switch result.errno {
    case EPERM, EROFS, EACCES: code = .perm
    case ENOMEM: code = .noMemory
    case EINVAL: code = .invalid
    case ENOSPC, EDQUOT, EFBIG: code = .noSpace
    case EOVERFLOW: code = flags.contains(.dontFragment) ? .overflow : .invalid
    case EOPNOTSUPP: code = flags.contains(.fastZero) ? .notSupported : .invalid
    case ESHUTDOWN: code = .shutdown
    default: code = .io
    }
    return Rejection(error: code, message: result.message ?? String(cString: strerror(result.errno)))
}
