import BlockTargets
import Glibc
import Logging

/// The one place where a system error becomes an NBD error. The NBD error
/// set is small; the real cause goes to the log, and to the client as the
/// message of a structured error reply.
func nbdError(for result: TargetResult, command: String, logger: Logger) -> Rejection {
    let code: NBDErrorCode
    switch result.errno {
    case EPERM, EROFS, EACCES: code = .perm
    case ENOMEM: code = .noMemory
    case EINVAL: code = .invalid
    case ENOSPC, EDQUOT, EFBIG: code = .noSpace
    case EOVERFLOW: code = .overflow
    case EOPNOTSUPP: code = .notSupported
    case ESHUTDOWN: code = .shutdown
    default: code = .io
    }
    let cause = result.message ?? String(cString: strerror(result.errno))
    logger.warning("\(command) failed: \(cause) (errno \(result.errno)), replying \(code)")
    return Rejection(error: code, message: cause)
}
