import NIOCore

/// What one connection's transmission phase decides, without the channel:
/// which requests start and in what order, when the socket is read, and
/// when the connection closes. The handler feeds it events (a request
/// read, one started or finished, the input's end, a stall check) and
/// carries out what it answers; it is tested on its own.
///
/// Requests read while the connection is at its limits wait, in order. A
/// read that needs room its event loop lacks is set aside until there is
/// some, and so is what follows it, but writes: their payloads are held
/// already, and only their end gives the room back (the spec lets requests
/// in flight run in any order). NBD_CMD_DISC still comes last: what follows
/// it is dropped.
struct TransmissionStateMachine {
    /// Limits of one connection before it stops starting requests.
    struct Limits {
        var requests: Int
        var bytes: Int
    }

    /// What to do with a request read from the socket.
    enum Arrival: Equatable {
        /// Nothing waits, and it may start: start it now.
        case start(NBDRequest)
        case queued
        /// It came after NBD_CMD_DISC: give its payload back, run nothing.
        case dropped
    }

    /// The next thing to do about the requests that wait.
    enum Next: Equatable {
        case start(NBDRequest)
        /// Requests were dropped (they followed NBD_CMD_DISC): give them
        /// back (`takeDropped`) and ask again, as their payloads may have
        /// been what the loop lacked room for.
        case dropped
        /// Nothing may start now.
        case none
    }

    let limits: Limits
    private(set) var requestsInFlight = 0
    private(set) var bytesInFlight = 0
    /// Requests read while the connection was at its limits, in order.
    private var waiting = CircularBuffer<NBDRequest>()
    /// Requests set aside, in order, until their loop has room.
    private var setAside = CircularBuffer<NBDRequest>()
    /// Requests the connection will never start (after NBD_CMD_DISC, or
    /// gone with it), for the handler to give their payloads back.
    private var dropped: [NBDRequest] = []
    /// NBD_CMD_DISC is set aside: what came after it is dropped.
    private var disconnectSetAside = false
    /// NBD_CMD_DISC ran: nothing after it starts.
    private(set) var disconnecting = false
    /// The input ended (the server stops, or the client half-closed):
    /// nothing more is read, but every request read is answered.
    private(set) var inputEnded = false
    private var readHeld = false
    private var wakeRequested = false
    /// Whether the target holds this batch's I/O until it ends.
    private var inBatch = false
    /// False once the connection closes or goes: nothing more is answered.
    private(set) var isActive = true
    /// Whether replies moved since the stall watch last looked.
    private var progressed = false

    init(limits: Limits) {
        self.limits = limits
    }

    // MARK: Requests

    /// A request was read; when it need not wait (`next` would start it at
    /// once), it starts without passing through the queue.
    mutating func received(_ request: consuming NBDRequest, loopHasRoom: Bool, writable: Bool) -> Arrival {
        guard !disconnecting && !disconnectSetAside else { return .dropped }
        if waiting.isEmpty && setAside.isEmpty && mayStart(writable: writable)
            && (loopHasRoom || request.type != CommandType.read.rawValue) {
            return .start(request)
        }
        waiting.append(request)
        return .queued
    }

    /// Whether another request may start: the connection is under its
    /// limits, and the client takes its replies (`writable`: the replies it
    /// leaves in the channel make it unwritable).
    private func mayStart(writable: Bool) -> Bool {
        requestsInFlight < limits.requests && bytesInFlight < limits.bytes && writable
    }

    /// The next request to start, in order, as far as the limits go; call
    /// until `.none`, then `takeDropped` and `needsWakeWhenRoom`.
    mutating func next(loopHasRoom: Bool, writable: Bool) -> Next {
        while !disconnecting && mayStart(writable: writable) {
            if !setAside.isEmpty && loopHasRoom { return .start(setAside.removeFirst()) }
            guard let request = waiting.popFirst() else { break }
            let isWrite = request.type == CommandType.write.rawValue
            let needsRoom = request.type == CommandType.read.rawValue && !loopHasRoom
            if isWrite || (setAside.isEmpty && !needsRoom) { return .start(consume request) }
            setAside.append(request)
            if request.type == CommandType.disconnect.rawValue {
                disconnectSetAside = true
                dropWaiting()
                if !dropped.isEmpty { return .dropped }
            }
        }
        if disconnecting {
            dropWaiting()
            dropSetAside()
        }
        return .none
    }

    private mutating func dropWaiting() {
        dropped.append(contentsOf: waiting)
        waiting.removeAll()
    }

    private mutating func dropSetAside() {
        dropped.append(contentsOf: setAside)
        setAside.removeAll()
    }

    /// The requests dropped since the last call.
    mutating func takeDropped() -> [NBDRequest] {
        defer { dropped.removeAll() }
        return dropped
    }

    /// Whether the handler must ask its loop to wake it when room comes
    /// back: requests are set aside for room, and no wake is asked yet.
    mutating func needsWakeWhenRoom(loopHasRoom: Bool) -> Bool {
        guard !setAside.isEmpty && !loopHasRoom && !wakeRequested else { return false }
        wakeRequested = true
        return true
    }

    mutating func roomCameBack() { wakeRequested = false }

    /// A request starts; returns whether it opens the target's batch.
    mutating func starting() -> Bool {
        defer { inBatch = true }
        return !inBatch
    }

    /// Whether a batch is open, to end now (it is then closed).
    mutating func endBatch() -> Bool {
        defer { inBatch = false }
        return inBatch
    }

    /// A request went to the target, holding `bytes` until it is answered.
    mutating func started(bytes: Int) {
        requestsInFlight += 1
        bytesInFlight += bytes
    }

    mutating func finished(bytes: Int) {
        requestsInFlight -= 1
        bytesInFlight -= bytes
    }

    /// NBD_CMD_DISC ran: nothing after it starts.
    mutating func disconnect() { disconnecting = true }

    // MARK: Reading

    /// Whether the connection reads on: when it is under its limits and
    /// nothing waits, or to end a payload begun whatever the limits
    /// (`insidePayload`: its bytes are counted already, and only its end
    /// lets them go).
    private func mayRead(insidePayload: Bool, writable: Bool) -> Bool {
        guard !disconnecting && !disconnectSetAside && !inputEnded else { return false }
        return (waiting.isEmpty && setAside.isEmpty && mayStart(writable: writable)) || insidePayload
    }

    /// The channel asks to read: whether to pass it on now (else it is
    /// held until `releaseHeldRead`).
    mutating func readRequested(insidePayload: Bool, writable: Bool) -> Bool {
        if mayRead(insidePayload: insidePayload, writable: writable) { return true }
        readHeld = true
        return false
    }

    /// Whether a held read may go now.
    mutating func releaseHeldRead(insidePayload: Bool, writable: Bool) -> Bool {
        guard readHeld && mayRead(insidePayload: insidePayload, writable: writable) else { return false }
        readHeld = false
        return true
    }

    // MARK: Closing

    /// The client's input ended: answer every request read, then close.
    mutating func inputClosed() { inputEnded = true }

    /// Replies moved (the handler resumed): the stall watch sees progress.
    mutating func progress() { progressed = true }

    /// Whether to close now, after NBD_CMD_DISC or the input's end: every
    /// request read has been answered. The connection is closing from then.
    mutating func closeIfDone() -> Bool {
        guard (disconnecting || inputEnded) && requestsInFlight == 0 && waiting.isEmpty && setAside.isEmpty
            && isActive else { return false }
        isActive = false
        return true
    }

    /// The stall watch starts: progress counts from now.
    mutating func watchingForStall() { progressed = false }

    /// The stall watch looks: whether to let the connection go, its client
    /// having taken no reply since the last look with nothing in flight (a
    /// slow target is waited for, however long).
    mutating func stallCheck() -> Bool {
        defer { progressed = false }
        guard isActive, !progressed, requestsInFlight == 0 else { return false }
        isActive = false
        return true
    }

    /// The connection is gone: nothing more is answered, and the requests
    /// that waited are dropped.
    mutating func connectionGone() {
        isActive = false
        dropWaiting()
        dropSetAside()
    }

    /// The channel went inactive: replies that come now go nowhere.
    mutating func channelInactive() { isActive = false }
}
