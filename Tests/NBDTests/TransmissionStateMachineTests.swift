@testable import NBD
import NIOCore
import Testing

/// The transmission phase's decisions on their own: no channel, no target.
@Suite struct TransmissionStateMachineTests {
    private func request(_ type: CommandType, cookie: UInt64, payload: Int = 0) -> NBDRequest {
        var payloadBytes: WritePayload?
        if payload > 0 {
            payloadBytes = WritePayload()
            payloadBytes!.append(ByteBuffer(repeating: 0, count: payload))
        }
        return NBDRequest(flags: 0, type: type.rawValue, cookie: cookie, offset: 0, length: UInt32(payload),
                          payload: payloadBytes)
    }

    /// Starts `request` as the handler does: counted in flight, but
    /// NBD_CMD_DISC, which goes to no target. Returns its cookie.
    private func begin(_ request: NBDRequest, _ machine: inout TransmissionStateMachine) -> UInt64 {
        if request.type == CommandType.disconnect.rawValue { machine.disconnect() } else { machine.started(bytes: 0) }
        return request.cookie
    }

    /// Hands `requests` to the machine as they are read; returns those it
    /// started at once.
    private func receive(_ machine: inout TransmissionStateMachine, _ requests: NBDRequest..., room: Bool = true,
                         writable: Bool = true) -> [UInt64] {
        requests.compactMap { request in
            guard case .start(let request) = machine.received(request, loopHasRoom: room, writable: writable) else {
                return nil
            }
            return begin(request, &machine)
        }
    }

    /// Starts what may start of what waits.
    private func startAll(_ machine: inout TransmissionStateMachine, room: Bool = true,
                          writable: Bool = true) -> [UInt64] {
        var started: [UInt64] = []
        while true {
            let next = machine.next(loopHasRoom: room, writable: writable)
            if next == .dropped { continue }
            guard case .start(let request) = next else { break }
            started.append(begin(request, &machine))
        }
        return started
    }

    @Test func aRequestStartsAtOnceOnlyWhenNothingWaitsAndItMay() {
        var machine = TransmissionStateMachine(limits: .init(requests: 2, bytes: 1 << 20))
        #expect(receive(&machine, request(.write, cookie: 1, payload: 512)) == [1])
        #expect(receive(&machine, request(.read, cookie: 2), room: false).isEmpty, "a read needs the loop's room")
        #expect(receive(&machine, request(.write, cookie: 3, payload: 512)).isEmpty,
                "a request waits behind one that waits")
        #expect(startAll(&machine) == [2])
        machine.finished(bytes: 0)
        machine.finished(bytes: 0)
        #expect(startAll(&machine) == [3])
        #expect(receive(&machine, request(.flush, cookie: 4), writable: false).isEmpty, "the client takes no replies")
        #expect(startAll(&machine) == [4])
        #expect(receive(&machine, request(.flush, cookie: 5)).isEmpty, "the connection is at its limit")
    }

    @Test func aRequestArrivingWhileAReadIsSetAsideWaitsBehindIt() {
        var machine = TransmissionStateMachine(limits: .init(requests: 8, bytes: 1 << 20))
        #expect(receive(&machine, request(.read, cookie: 1), room: false).isEmpty)
        #expect(startAll(&machine, room: false).isEmpty, "the read is set aside")
        #expect(receive(&machine, request(.flush, cookie: 2)).isEmpty, "room came back, but the read goes first")
        #expect(startAll(&machine) == [1, 2])
    }

    @Test func requestsBeyondTheLimitWaitAndStartInOrderAsOthersEnd() {
        var machine = TransmissionStateMachine(limits: .init(requests: 2, bytes: 1 << 20))
        #expect(receive(&machine, request(.read, cookie: 0), request(.read, cookie: 1), request(.read, cookie: 2),
                        request(.read, cookie: 3), request(.read, cookie: 4)) == [0, 1])
        #expect(startAll(&machine).isEmpty)
        #expect(machine.readRequested(insidePayload: false, writable: true) == false, "no reading while requests wait")
        machine.finished(bytes: 0)
        #expect(startAll(&machine) == [2])
        machine.finished(bytes: 0)
        machine.finished(bytes: 0)
        #expect(startAll(&machine) == [3, 4])
        machine.finished(bytes: 0)
        machine.finished(bytes: 0)
        #expect(machine.releaseHeldRead(insidePayload: false, writable: true) == true)
    }

    @Test func nothingStartsWhileTheClientTakesNoReplies() {
        var machine = TransmissionStateMachine(limits: .init(requests: 8, bytes: 1 << 20))
        #expect(receive(&machine, request(.read, cookie: 1), writable: false).isEmpty)
        #expect(startAll(&machine, writable: false).isEmpty)
        #expect(startAll(&machine, writable: true) == [1])
    }

    @Test func aReadWithoutRoomIsSetAsideWithWhatFollowsButWrites() {
        var machine = TransmissionStateMachine(limits: .init(requests: 8, bytes: 1 << 20))
        #expect(receive(&machine, request(.read, cookie: 1), request(.flush, cookie: 2),
                        request(.write, cookie: 3, payload: 512), room: false).isEmpty)
        #expect(startAll(&machine, room: false) == [3], "a write's payload is held already: it goes on")
        #expect(machine.needsWakeWhenRoom(loopHasRoom: false) == true)
        #expect(machine.needsWakeWhenRoom(loopHasRoom: false) == false, "one wake asked is enough")
        machine.roomCameBack()
        #expect(startAll(&machine, room: true) == [1, 2], "in their order")
        #expect(machine.needsWakeWhenRoom(loopHasRoom: true) == false)
    }

    @Test func whatFollowsADisconnectSetAsideIsDroppedAndItStillComesLast() {
        var machine = TransmissionStateMachine(limits: .init(requests: 8, bytes: 1 << 20))
        #expect(receive(&machine, request(.read, cookie: 1), request(.disconnect, cookie: 2),
                        request(.write, cookie: 3, payload: 512), room: false).isEmpty)
        #expect(startAll(&machine, room: false).isEmpty)
        #expect(machine.takeDropped().map(\.cookie) == [3])
        #expect(machine.received(request(.write, cookie: 4, payload: 512), loopHasRoom: true, writable: true) == .dropped)
        #expect(machine.readRequested(insidePayload: false, writable: true) == false)
        #expect(startAll(&machine, room: true) == [1, 2])
        #expect(machine.disconnecting)
    }

    /// The payload of what followed NBD_CMD_DISC may be what the loop
    /// lacked room for: once it is dropped, the machine is asked again.
    @Test func droppingWhatFollowsADisconnectAsksToBeAskedAgain() {
        var machine = TransmissionStateMachine(limits: .init(requests: 8, bytes: 1 << 20))
        #expect(receive(&machine, request(.read, cookie: 1), request(.disconnect, cookie: 2),
                        request(.write, cookie: 3, payload: 512), room: false).isEmpty)
        #expect(machine.next(loopHasRoom: false, writable: true) == .dropped)
        #expect(machine.takeDropped().map(\.cookie) == [3])
        // The write's bytes given back, the loop has room again.
        #expect(machine.next(loopHasRoom: true, writable: true) == .start(request(.read, cookie: 1)))
    }

    @Test func afterADisconnectNothingStartsAndTheConnectionClosesOnceAnswered() {
        var machine = TransmissionStateMachine(limits: .init(requests: 8, bytes: 1 << 20))
        #expect(receive(&machine, request(.read, cookie: 1), request(.disconnect, cookie: 2)) == [1, 2])
        #expect(machine.received(request(.read, cookie: 3), loopHasRoom: true, writable: true) == .dropped)
        #expect(machine.closeIfDone() == false, "the read is still in flight")
        machine.finished(bytes: 0)
        #expect(machine.closeIfDone() == true)
        #expect(!machine.isActive)
        #expect(machine.closeIfDone() == false, "closes once")
    }

    @Test func aPayloadBegunIsReadToItsEndWhateverTheLimits() {
        var machine = TransmissionStateMachine(limits: .init(requests: 1, bytes: 1 << 20))
        #expect(receive(&machine, request(.read, cookie: 1), request(.read, cookie: 2)) == [1])
        #expect(machine.readRequested(insidePayload: false, writable: true) == false)
        #expect(machine.readRequested(insidePayload: true, writable: true) == true)
        machine.inputClosed()
        #expect(machine.readRequested(insidePayload: true, writable: true) == false, "nothing is read after the input's end")
    }

    @Test func theStallWatchLetsGoOnlyOfAnIdleClientThatTakesNoReplies() {
        var machine = TransmissionStateMachine(limits: .init(requests: 8, bytes: 1 << 20))
        machine.inputClosed()
        machine.watchingForStall()
        machine.started(bytes: 0)
        #expect(machine.stallCheck() == false, "a slow target is waited for")
        machine.finished(bytes: 0)
        machine.progress()
        #expect(machine.stallCheck() == false, "replies moved since the last look")
        #expect(machine.stallCheck() == true)
        #expect(!machine.isActive)
    }

    @Test func aGoneConnectionDropsWhatWaited() {
        var machine = TransmissionStateMachine(limits: .init(requests: 1, bytes: 1 << 20))
        #expect(receive(&machine, request(.read, cookie: 1), request(.write, cookie: 2, payload: 512)) == [1])
        machine.connectionGone()
        #expect(machine.takeDropped().map(\.cookie) == [2])
        #expect(!machine.isActive)
    }

    @Test func aBatchOpensWithItsFirstRequestAndEndsOnce() {
        var machine = TransmissionStateMachine(limits: .init(requests: 8, bytes: 1 << 20))
        #expect(machine.endBatch() == false)
        #expect(machine.starting() == true)
        #expect(machine.starting() == false)
        #expect(machine.endBatch() == true)
        #expect(machine.endBatch() == false)
    }
}
