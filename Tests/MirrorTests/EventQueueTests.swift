import BlockTargets
import Monitoring
import Testing

/// A listener's queue when it reads slower than the mirror changes: the
/// hook's forgets and goes on, a watcher's drops it; either way it is told.
struct EventQueueTests {
    private func event(_ number: Int) -> Event {
        Event("change", "leg", [Event.Field("leg", "\(number)")])
    }

    private func drain(_ queue: EventQueue) -> [EventQueue.Next] {
        var seen: [EventQueue.Next] = []
        while true {
            let next = queue.next(waitingAtMost: .zero)
            if next == .idle || next == .closed { return seen }
            seen.append(next)
            if next == .overflowed && seen.filter({ $0 == .overflowed }).count > 1 { return seen }
        }
    }

    @Test func aFullQueueThatForgetsSaysSoThenGoesOnWithTheEventsAfter() {
        let queue = EventQueue(capacity: 3, overflow: .forget) { _ in true }
        for number in 1...5 { #expect(queue.offer(event(number)), "one that forgets is never dropped") }
        #expect(drain(queue) == [.overflowed, .event(event(4)), .event(event(5))])
        #expect(queue.offer(event(6)))
        #expect(drain(queue) == [.event(event(6))], "told once, then as before")
    }

    @Test func aFullQueueThatDropsKeepsWhatItHeldAndIsToldLast() {
        let queue = EventQueue(capacity: 2, overflow: .drop) { _ in true }
        #expect(queue.offer(event(1)))
        #expect(queue.offer(event(2)))
        #expect(!queue.offer(event(3)), "the listener is to be dropped")
        #expect(!queue.offer(event(4)))
        #expect(drain(queue) == [.event(event(1)), .event(event(2)), .overflowed, .overflowed])
    }

    @Test func eventsTheListenerDoesNotWantTakeNoRoom() {
        let queue = EventQueue(capacity: 1, overflow: .drop) { $0 == event(2) }
        #expect(queue.offer(event(1)))
        #expect(queue.offer(event(2)))
        #expect(queue.offer(event(3)))
        #expect(drain(queue) == [.event(event(2))])
    }

    @Test func eventsComeInOrderAcrossTheQueueCompactingWhatWasRead() {
        let queue = EventQueue(capacity: EventQueue.defaultCapacity, overflow: .drop) { _ in true }
        var expected: [EventQueue.Next] = []
        for round in 0..<5 {
            for number in round * 300..<(round + 1) * 300 {
                #expect(queue.offer(event(number)))
                expected.append(.event(event(number)))
            }
            for _ in 0..<200 { #expect(queue.next(waitingAtMost: .zero) == expected.removeFirst()) }
        }
        #expect(drain(queue) == expected)
    }

    @Test func aClosedQueueHandsOutWhatItHeldThenSaysClosed() {
        let queue = EventQueue(capacity: 4, overflow: .forget) { _ in true }
        #expect(queue.offer(event(1)))
        queue.close()
        #expect(queue.next() == .event(event(1)))
        #expect(queue.next() == .closed)
        #expect(queue.next(waitingAtMost: .milliseconds(1)) == .closed)
    }
}
