import CDMIOSupport
import Glibc
import LibNBD
import Synchronization

/// An NBD export on another machine (or another process), reached through
/// libnbd's asynchronous API with many commands in flight. Each operation
/// becomes NBD commands: discard NBD_CMD_TRIM, write-zeroes
/// NBD_CMD_WRITE_ZEROES (NO_HOLE unless it may unmap), or writes from the
/// zero page on a server that cannot zero.
///
/// Where the server offers multi-conn, its commands go on several
/// connections (`DeviceOptions.remoteConnections`), each bio wholly on one.
/// The NBD protocol (doc/proto.md, transmission flags, bit 8,
/// NBD_FLAG_CAN_MULTI_CONN): "if this flag is present, then the effects of
/// NBD_CMD_FLUSH and NBD_CMD_FLAG_FUA MUST be visible across all
/// connections when the server sends its reply to that command to the
/// client. In the absence of this flag, clients SHOULD NOT multiplex their
/// commands over more than one connection to the export." So a flush (or a
/// FUA write) goes on any one connection and covers the writes completed on
/// all; without the flag, one connection.
final class RemoteNBDDevice: DeviceDriver, @unchecked Sendable {
    let kind = DeviceKind.remote
    let size: UInt64
    let blockSize: Int
    let isReadOnly: Bool
    let memoryAlignment = 1
    let wasCreated = false
    let isInMemory = false
    let openWarning: String?
    private let connections: [RemoteConnection]
    /// Where the next look for the least busy connection starts: one on
    /// each time, so that ties go round-robin.
    private let turn = Atomic<UInt>(0)

    init(uri: String, options: DeviceOptions) throws(DMIOError) {
        do {
            let first = try Self.connect(to: uri, options: options)
            size = try first.size()
            isReadOnly = try options.readOnly || first.isReadOnly()
            blockSize = max(1, Int(try first.blockSize(.minimum)))
            let wanted = Self.connectionCount(asked: options.remoteConnections, multiConn: try first.canMultiConn())
            var warning = wanted.warning
            var handles = [first]
            while handles.count < wanted.count {
                let handle: NBDHandle
                do throws(NBDError) {
                    handle = try Self.connect(to: uri, options: options)
                } catch {
                    // The server took one connection and refuses more (a
                    // connection limit): the device goes on with those it has.
                    warning = "connection \(handles.count + 1) of \(wanted.count) failed (\(error.message)): "
                        + "\(handles.count) connection\(handles.count == 1 ? "" : "s")"
                    break
                }
                let other = try handle.size()
                guard other == size else {
                    throw NBDError(errno: EIO, message: "connection \(handles.count + 1) finds an export of \(other) "
                                   + "bytes, connection 1 one of \(size): not the same export")
                }
                handles.append(handle)
            }
            openWarning = warning
            connections = try handles.map { handle throws(NBDError) in
                try RemoteConnection(handle: handle, timeout: options.remoteTimeout)
            }
        } catch let error as NBDError {
            throw .remoteFailed(device: uri, message: error.message)
        } catch {
            throw .remoteFailed(device: uri, message: "\(error)")
        }
        for connection in connections { connection.start() }
    }

    deinit {
        for connection in connections { connection.stop() }
    }

    var zeroesCheaply: Bool { connections[0].canZero }
    var connectionCount: Int? { connections.count }

    /// What a server holds is its own business: data everywhere.
    func allocation(offset: UInt64, length: UInt64, maxExtents: Int) throws(DMIOError) -> [DeviceExtent] {
        [DeviceExtent(length: length, isHole: false)]
    }

    func isHole(offset: UInt64, length: UInt64) -> Bool { false }

    /// How many connections to open, and why fewer than asked. A server
    /// without multi-conn may cache writes per connection: a flush on one
    /// would not cover writes acknowledged on another, so it gets one.
    private static func connectionCount(asked: Int?, multiConn: Bool) -> (count: Int, warning: String?) {
        guard multiConn else {
            guard let asked, asked > 1 else { return (1, nil) }
            return (1, "\(asked) connections asked for, but the server does not offer multi-conn: one connection "
                    + "(without it, a flush on one connection would not cover writes acknowledged on another)")
        }
        return (asked ?? DeviceOptions.defaultRemoteConnections, nil)
    }

    /// A connection to `uri` with its handshake done, or ETIMEDOUT once
    /// `options.remoteTimeout` has passed: a host that drops packets, or a
    /// server that accepts and never answers, must not hold up the mirror's
    /// start.
    private static func connect(to uri: String, options: DeviceOptions) throws(NBDError) -> NBDHandle {
        let handle = try NBDHandle()
        try handle.setTLS(options.remoteTLS)
        guard let timeout = options.remoteTimeout else {
            try handle.connect(uri: uri)
            return handle
        }
        try handle.startConnecting(uri: uri)
        let deadline = ContinuousClock.now + timeout
        while handle.isConnecting {
            let left = ContinuousClock.now.duration(to: deadline)
            guard left > .zero else { throw NBDError(errno: ETIMEDOUT, message: "no answer within \(seconds(timeout))") }
            try handle.poll(milliseconds: milliseconds(left))
        }
        if handle.isDead { throw NBDError(errno: ECONNRESET, message: "the server closed the connection during the handshake") }
        return handle
    }

    func issue(_ bio: Bio, batch: inout BioBatch) {
        let connection = leastBusy()
        connection.send(bio)
        connection.wakeIfNeeded()
        connection.finishCompleted()
    }

    /// The connection with the fewest bios in flight, from the next in turn
    /// on. The counts are read without ordering: a hint, and two bios
    /// issued at once may both take the same connection.
    private func leastBusy() -> RemoteConnection {
        let count = UInt(connections.count)
        guard count > 1 else { return connections[0] }
        let start = turn.wrappingAdd(1, ordering: .relaxed).oldValue
        var chosen = connections[Int(start % count)]
        var fewest = chosen.biosInFlight
        var step: UInt = 1
        while fewest > 0 && step < count {
            let candidate = connections[Int((start &+ step) % count)]
            let inFlight = candidate.biosInFlight
            if inFlight < fewest {
                chosen = candidate
                fewest = inFlight
            }
            step += 1
        }
        return chosen
    }
}

/// One libnbd connection and the thread that drives it: it polls the socket
/// and a pipe that submitters write to when they queue commands. Commands
/// may complete while libnbd holds its handle lock, so completions are only
/// collected there and finished after the lock is released. A bio sent on
/// it ends on it: its commands' completions find it through
/// `Bio.remoteConnection`.
///
/// A connection that owes replies and moves no byte either way for
/// `timeout` is cut off, as the kernel's NBD client does: its commands fail
/// with ETIMEDOUT rather than hold every mirrored write until TCP gives up
/// (minutes to hours).
final class RemoteConnection: @unchecked Sendable {
    private let handle: NBDHandle
    private let timeout: Duration?
    /// Set once the server was cut off for silence: every failure of this
    /// connection is then reported as ETIMEDOUT.
    private let timedOut = Atomic<Bool>(false)
    private let canFlush: Bool
    private let canFUA: Bool
    let canTrim: Bool
    let canZero: Bool
    /// Bios sent and not yet finished, by which the device picks the least
    /// busy connection.
    private let inFlight = Atomic<Int>(0)

    private let completedLock = ConditionLock()
    private var completed = BioBatch()
    private var stopping = false
    private let wakePipe: (read: Int32, write: Int32)
    /// Set by the poller before it looks at what is owed, cleared once it
    /// knows its wait has a deadline (or needs none: no timeout): while set,
    /// a command queued may go unseen by a wait without a deadline, and
    /// the timeout would never start for it (`wakeIfNeeded`).
    private let mayWaitWithoutDeadline = Atomic<Bool>(false)
    private var poller = pthread_t()

    init(handle: NBDHandle, timeout: Duration?) throws(NBDError) {
        self.handle = handle
        self.timeout = timeout
        canFlush = try handle.canFlush()
        canFUA = try handle.canFUA()
        canTrim = try handle.canTrim()
        canZero = try handle.canZero()
        var fds: [Int32] = [0, 0]
        guard dmio_pipe_nonblocking(&fds) == 0 else {
            throw NBDError(errno: errno, message: "pipe2: \(errnoDescription(errno))")
        }
        wakePipe = (fds[0], fds[1])
    }

    deinit {
        Glibc.close(wakePipe.read)
        Glibc.close(wakePipe.write)
    }

    /// Starts the thread, once every connection of the device is made (one
    /// that fails leaves none running).
    func start() {
        poller = startThread(named: "dmio-nbd-remote") { [self] in pollLoop() }
    }

    /// Stops the thread and closes the connection.
    func stop() {
        completedLock.withLock { stopping = true }
        wake()
        pthread_join(poller, nil)
        handle.shutdown()
    }

    var biosInFlight: Int { inFlight.load(ordering: .relaxed) }

    /// Queues the NBD commands that carry out `bio`.
    func send(_ bio: Bio) {
        inFlight.add(1, ordering: .relaxed)
        bio.remoteConnection = self
        // One count for this function, so that the bio cannot finish while
        // its commands are still being queued.
        bio.openParts.store(1, ordering: .relaxed)
        let fua: NBDCommandFlags = bio.flags.contains(.fua) && canFUA ? .fua : []
        bio.needsFlushAfterWrite = bio.flags.contains(.fua) && !canFUA && canFlush
        switch bio.operation {
        case .read, .write:
            let (iovecs, count) = bio.iovecs
            var offset = bio.offset
            let write = bio.operation == .write
            for index in 0..<count {
                let segment = iovecs[index]
                queue(bio) { (handle: NBDHandle, userData) throws(NBDError) in
                    if write {
                        try handle.aioPwrite(segment.iov_base!, count: segment.iov_len, offset: offset,
                                             flags: fua, userData: userData, completion: remoteCompletion)
                    } else {
                        try handle.aioPread(into: segment.iov_base!, count: segment.iov_len, offset: offset,
                                            userData: userData, completion: remoteCompletion)
                    }
                }
                offset += UInt64(segment.iov_len)
            }
        case .writeZeroes where !canZero:
            // A server that cannot zero gets the whole range written from the
            // zero page, a megabyte at a time.
            var offset = bio.offset
            var left = bio.remaining
            while left > 0 {
                let length = Int(min(left, UInt64(ZeroPage.size)))
                queue(bio) { (handle: NBDHandle, userData) throws(NBDError) in
                    try handle.aioPwrite(ZeroPage.bytes, count: length, offset: offset, flags: fua,
                                         userData: userData, completion: remoteCompletion)
                }
                offset += UInt64(length)
                left -= UInt64(length)
            }
        case .flush:
            bio.needsFlushAfterWrite = false
            if canFlush { queueFlush(bio) }
        case .writeZeroes:
            let (offset, length) = (bio.offset, bio.remaining)
            var flags = fua
            if bio.flags.contains(.noUnmap) { flags.insert(.noHole) }
            queue(bio) { (handle: NBDHandle, userData) throws(NBDError) in
                try handle.aioZero(count: length, offset: offset, flags: flags,
                                   userData: userData, completion: remoteCompletion)
            }
        case .discard where canTrim:
            let (offset, length) = (bio.offset, bio.remaining)
            queue(bio) { (handle: NBDHandle, userData) throws(NBDError) in
                try handle.aioTrim(count: length, offset: offset, flags: fua,
                                   userData: userData, completion: remoteCompletion)
            }
        case .discard:
            bio.needsFlushAfterWrite = false
            record(EOPNOTSUPP, for: bio)
        }
        partEnded(bio, errno: 0)
    }

    private func queueFlush(_ bio: Bio) {
        queue(bio) { (handle: NBDHandle, userData) throws(NBDError) in
            try handle.aioFlush(userData: userData, completion: remoteCompletion)
        }
    }

    /// Queues one command of `bio`; the command's completion (or its failure
    /// to queue) ends one part.
    private func queue(_ bio: Bio, _ command: (NBDHandle, UnsafeMutableRawPointer) throws(NBDError) -> Void) {
        bio.openParts.add(1, ordering: .relaxed)
        let userData = Unmanaged.passRetained(bio).toOpaque()
        do {
            try command(handle, userData)
        } catch {
            Unmanaged<Bio>.fromOpaque(userData).release()
            // libnbd refuses a command on a dead connection as if it were
            // invalid (EINVAL): the leg's server went away.
            partEnded(bio, errno: handle.isDead ? ENOTCONN : error.errno != 0 ? error.errno : EIO)
        }
    }

    private func record(_ errno: Int32, for bio: Bio) {
        _ = bio.firstPartError.compareExchange(expected: 0, desired: errno, ordering: .relaxed)
    }

    /// Ends one part of `bio`; the last part moves the bio to the completed
    /// list. Runs inside libnbd's completion callback, with the handle's lock
    /// held: it must not call into the handle.
    func partEnded(_ bio: Bio, errno: Int32) {
        if errno != 0 { record(timedOut.load(ordering: .relaxed) ? ETIMEDOUT : errno, for: bio) }
        guard bio.openParts.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 else { return }
        completedLock.withLock { completed.append(bio) }
    }

    /// Finishes the completed bios, outside libnbd's lock. A FUA write to a
    /// server without FUA first gets a flush, which makes it durable.
    func finishCompleted() {
        var batch = completedLock.withLock {
            let batch = completed
            completed = BioBatch()
            return batch
        }
        while let bio = batch.popFirst() {
            let error = bio.firstPartError.load(ordering: .relaxed)
            if bio.needsFlushAfterWrite && error == 0 {
                bio.needsFlushAfterWrite = false
                bio.openParts.store(1, ordering: .relaxed)
                queueFlush(bio)
                partEnded(bio, errno: 0)
                wake()
                continue
            }
            inFlight.subtract(1, ordering: .relaxed)
            bio.finish(errno: error)
        }
    }

    func wake() {
        var byte: UInt8 = 1
        _ = Glibc.write(wakePipe.write, &byte, 1)
    }

    /// Wakes the poller after a command was queued only when it must look
    /// again: libnbd has bytes of it left to send (the poller may wait to
    /// read only), or the poller may wait without a deadline for replies
    /// it did not know were owed. Otherwise its wait ends with the replies:
    /// no pipe write, no wake-up of a thread per request.
    func wakeIfNeeded() {
        // libnbd's handle lock orders the queueing (in_flight++) and the
        // poller's look at what is owed (nbd_aio_in_flight takes it too):
        // either that look came after the queueing, or this load sees the
        // flag the poller set before it. (Should nbd_aio_in_flight ever go
        // lock-free, this needs looking at again.)
        if mayWaitWithoutDeadline.load(ordering: .sequentiallyConsistent) || handle.direction.wantsWrite { wake() }
    }

    private func pollLoop() {
        var fds = [pollfd(fd: wakePipe.read, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: -1, events: 0, revents: 0)]
        var drain = [UInt8](repeating: 0, count: 64)
        // When the connection last moved (bytes in or out), or began to owe replies.
        var lastMoved = ContinuousClock.now
        var owedBefore = false
        while true {
            if completedLock.withLock({ stopping }) { return }
            mayWaitWithoutDeadline.store(timeout != nil, ordering: .sequentiallyConsistent)
            // A dead connection has failed its commands already (libnbd
            // reports the error to each); its socket, if still open, would
            // only report POLLHUP forever, so it is no longer polled.
            let dead = handle.isDead
            let owed = !dead && handle.commandsInFlight > 0
            if owed { mayWaitWithoutDeadline.store(false, ordering: .relaxed) }
            if owed && !owedBefore { lastMoved = .now }
            owedBefore = owed
            var wait: Int32 = -1
            var overdue = false
            if owed, let timeout {
                let left = ContinuousClock.now.duration(to: lastMoved + timeout)
                // Overdue: one more look, without waiting, before giving up;
                // this thread may have been held up (a paused machine), not
                // the server, and what it sent may be waiting.
                overdue = left <= .zero
                wait = overdue ? 0 : milliseconds(left)
            }
            let direction = handle.direction
            fds[1].fd = dead ? -1 : handle.fileDescriptor
            fds[1].events = (direction.wantsRead ? Int16(POLLIN) : 0) | (direction.wantsWrite ? Int16(POLLOUT) : 0)
            fds[0].revents = 0
            fds[1].revents = 0
            let ready = poll(&fds, 2, wait)
            if ready < 0 && errno != EINTR { return }
            if fds[0].revents & Int16(POLLIN) != 0 {
                while Glibc.read(wakePipe.read, &drain, drain.count) > 0 {}
            }
            // A hung-up socket goes to whichever side libnbd waits on, so
            // that libnbd sees the end and the loop does not spin on it.
            let events = fds[1].revents
            if events & Int16(POLLIN | POLLHUP | POLLERR) != 0 && handle.direction.wantsRead {
                lastMoved = .now
                _ = try? handle.notifyRead()
            } else if events & Int16(POLLOUT | POLLHUP | POLLERR) != 0 && handle.direction.wantsWrite {
                lastMoved = .now
                _ = try? handle.notifyWrite()
            } else if overdue && ready >= 0 {
                cutOff()
                lastMoved = .now
            }
            finishCompleted()
        }
    }

    /// Ends a connection that owed replies and did not move for `timeout`:
    /// with its socket shut down, libnbd sees the end of the stream at the
    /// next poll and fails every command in flight.
    private func cutOff() {
        timedOut.store(true, ordering: .relaxed)
        Glibc.shutdown(handle.fileDescriptor, Int32(SHUT_RDWR))
    }
}

/// libnbd calls this when a command of a remote bio completes, with the
/// handle's lock held: the handle of the connection that sent the bio.
private let remoteCompletion: NBDCompletion = { userData, error in
    let bio = Unmanaged<Bio>.fromOpaque(userData!).takeRetainedValue()
    bio.remoteConnection.unsafelyUnwrapped.partEnded(bio, errno: error?.pointee ?? 0)
    return 1
}

/// `duration` in whole milliseconds for poll(2), rounded up so that a wait
/// never ends just before its deadline.
private func milliseconds(_ duration: Duration) -> Int32 {
    let (seconds, attoseconds) = duration.components
    let total = seconds * 1000 + (attoseconds + 999_999_999_999_999) / 1_000_000_000_000_000
    return Int32(clamping: max(0, total))
}

private func seconds(_ duration: Duration) -> String {
    let (seconds, attoseconds) = duration.components
    return attoseconds == 0 ? "\(seconds) s" : "\(Double(seconds) + Double(attoseconds) / 1e18) s"
}
