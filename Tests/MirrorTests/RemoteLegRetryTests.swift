@testable import Mirror
import Testing

/// When a lost remote leg is tried again, without a clock or a server.
struct RemoteLegRetryTests {
    private let leg = MirrorUUID(high: 1, low: 1)
    private let start = ContinuousClock.now

    @Test func triesAfterTheFirstIntervalThenTwiceAsLongUpToTheLongest() {
        var retry = RemoteLegRetry(first: .seconds(2), longest: .seconds(5))
        retry.track([leg], now: start)
        #expect(retry.action(for: leg, now: start + .seconds(1)) == .wait)
        #expect(retry.action(for: leg, now: start + .seconds(2)) == .tryNow)
        retry.failed(leg, now: start + .seconds(2))
        #expect(retry.nextDue(now: start + .seconds(2)) == .seconds(4))
        retry.failed(leg, now: start + .seconds(6))
        #expect(retry.nextDue(now: start + .seconds(6)) == .seconds(5), "no longer than the longest")
    }

    @Test func aRefusedLegIsNotTriedUntilItIsForgottenAndLostAgain() {
        var retry = RemoteLegRetry(first: .seconds(1))
        retry.track([leg], now: start)
        retry.refuse(leg)
        retry.track([leg], now: start + .seconds(10))
        #expect(retry.action(for: leg, now: start + .seconds(60)) == .wait)
        #expect(retry.nextDue(now: start) == nil)
        // An operator brought it back; lost again later, it is tried again.
        retry.track([], now: start + .seconds(61))
        retry.track([leg], now: start + .seconds(62))
        #expect(retry.action(for: leg, now: start + .seconds(63)) == .tryNow)
    }
}
