import DMIO

/// The DMIO client a target request's I/O goes on, passed with every
/// request as every dm-io request names its client: the calling event
/// loop's own (its io_uring, which only that loop's thread may use), or
/// none, and the target then uses the client it was made with.
///
/// A target submits on `client(or:)` only within the call, on the calling
/// thread. I/O started later, from a completion or after a wait (a bitmap
/// commit, a copy that held the region), goes on the target's own client:
/// a completion may run on any thread, and the loop's ring refuses others.
public struct IOContext: Sendable {
    /// The calling loop's own client, if it has one.
    public let loopClient: DMIOClient?

    public init(loopClient: DMIOClient?) {
        self.loopClient = loopClient
    }

    /// For callers with no client of their own: threads that may block,
    /// loops where io_uring was refused.
    public static let targetsOwn = IOContext(loopClient: nil)

    /// The client to submit on now: the loop's, or else the target's `own`.
    @inline(__always)
    public func client(or own: DMIOClient) -> DMIOClient { loopClient ?? own }
}
