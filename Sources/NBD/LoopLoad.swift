import NIOCore

/// What the connections of one event loop hold: the requests they started
/// and have not answered (a stop waits for them), and the bytes of requests
/// and replies they buffer, which the server bounds. Touched only on that
/// loop: counting costs the request path no lock and no atomic operation.
///
/// Buffered bytes are a write's payload from its header on (the framer
/// takes them) until the legs have it, and a read's reply from its start
/// until the socket took it. While the loop is at its share of the bound,
/// its connections frame no new request and start no read; everything
/// already taken goes on, so room always comes back unless clients hold it
/// by taking none of their replies (then only their connections wait).
final class LoopLoad: @unchecked Sendable {
    /// Bytes this loop's connections may buffer before they stop: its share
    /// of the server's bound. A request that starts under it may pass it by
    /// its own length.
    let bufferLimit: Int
    var requestsInFlight = 0
    private(set) var bufferedBytes = 0
    /// Handlers stopped for room, woken once there is some; each leaves
    /// when its connection goes.
    private var waitingForRoom: [ObjectIdentifier: () -> Void] = [:]
    /// Bytes given back since the last check for freed memory to return.
    private var releasedSinceCheck = 0
    /// Large reply buffers the socket is done with, for this loop's next
    /// large replies: a fresh megabyte costs its page faults every time.
    private var spareReplyBuffers: [ByteBuffer] = []
    private var spareBytes = 0
    static let maxSpareBytes = 8 << 20
    /// Bytes given back that make a burst worth returning memory after.
    static let burstBytes = 8 << 20

    init(bufferLimit: Int) {
        self.bufferLimit = bufferLimit
    }

    var hasRoom: Bool { bufferedBytes < bufferLimit }

    func take(_ bytes: Int) {
        bufferedBytes += bytes
    }

    func give(_ bytes: Int) {
        bufferedBytes -= bytes
        releasedSinceCheck += bytes
        if hasRoom && !waitingForRoom.isEmpty {
            let woken = waitingForRoom.values
            waitingForRoom = [:]
            for wake in woken { wake() }
        }
    }

    /// Calls `wake` once there is room again; `waiter` (a handler) waits
    /// once at most. Call only when there is none. `wake` runs inside
    /// whatever gave the room back: it should only schedule work.
    func whenRoom(for waiter: AnyObject, _ wake: @escaping () -> Void) {
        waitingForRoom[ObjectIdentifier(waiter)] = wake
    }

    /// `waiter`'s connection is gone: it waits no more.
    func stopWaiting(_ waiter: AnyObject) {
        waitingForRoom[ObjectIdentifier(waiter)] = nil
    }

    /// Whether much memory was freed since the last look and nothing is
    /// buffered now: a burst is over, and malloc should hand its free pages
    /// back to the kernel (it keeps them otherwise, for ever).
    func burstEnded() -> Bool {
        defer { if bufferedBytes == 0 { releasedSinceCheck = 0 } }
        return bufferedBytes == 0 && releasedSinceCheck >= Self.burstBytes
    }

    /// A spare buffer of at least `capacity` bytes, cleared, if one is kept.
    func spareReplyBuffer(capacity: Int) -> ByteBuffer? {
        guard let index = spareReplyBuffers.lastIndex(where: { $0.capacity >= capacity }) else { return nil }
        var buffer = spareReplyBuffers.remove(at: index)
        spareBytes -= buffer.capacity
        buffer.clear()
        return buffer
    }

    func keepForReuse(_ buffer: ByteBuffer) {
        guard spareBytes + buffer.capacity <= Self.maxSpareBytes else { return }
        spareReplyBuffers.append(buffer)
        spareBytes += buffer.capacity
    }

    /// Drops the spare buffers, so that their memory can go back.
    func dropSpares() {
        spareReplyBuffers.removeAll()
        spareBytes = 0
    }
}
