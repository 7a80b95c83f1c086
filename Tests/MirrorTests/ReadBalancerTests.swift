@testable import Mirror
import Testing

/// The read policy without a mirror: which leg a read goes to, given what
/// each leg has in flight and where its last read ended.
struct ReadBalancerTests {
    @Test func aReadGoesToTheLegWithTheFewestReadsInFlight() {
        let balancer = ReadBalancer(policy: .balanced)
        balancer.started(0, offset: 1 << 20, length: 4096)
        balancer.started(0, offset: 2 << 20, length: 4096)
        balancer.started(2, offset: 3 << 20, length: 4096)
        #expect(balancer.choose(offset: 9 << 20, among: [0, 2, 5]) == 2, "leg 5 has none in flight")
        #expect(balancer.choose(offset: 9 << 20, among: [0, 2]) == 1)
        balancer.ended(0)
        balancer.ended(0)
        #expect(balancer.choose(offset: 9 << 20, among: [0, 2]) == 0, "a tie goes to the first")
    }

    @Test func aReadThatContinuesALegsLastReadStaysOnThatLeg() {
        let balancer = ReadBalancer(policy: .balanced)
        balancer.started(1, offset: 0, length: 65536)
        balancer.started(1, offset: 65536, length: 65536)
        #expect(balancer.choose(offset: 131072, among: [0, 1]) == 1, "busier, but the stream is there")
        #expect(balancer.choose(offset: 196608, among: [0, 1]) == 0, "not where leg 1's last read ended")
    }

    @Test func aLegNotReadYetContinuesNothing() {
        let balancer = ReadBalancer(policy: .balanced)
        for leg in [0, 1] {
            balancer.started(leg, offset: 1 << 20, length: 4096)
            balancer.ended(leg)
        }
        // Leg 2 has read nothing: a read at offset 0 does not continue it.
        #expect(balancer.choose(offset: 0, among: [0, 1, 2]) == 0, "a tie goes to the first")
    }

    @Test func aStreamLeavesALegThatFallsBehind() {
        let balancer = ReadBalancer(policy: .balanced)
        var offset: UInt64 = 1 << 20
        for _ in 0...ReadBalancer.streamSlack {
            #expect(balancer.choose(offset: offset, among: [0, 1]) == 0, "the stream stays while leg 0 keeps up")
            balancer.started(0, offset: offset, length: 1 << 20)
            offset += 1 << 20
        }
        #expect(balancer.choose(offset: offset, among: [0, 1]) == 1, "leg 0 has 5 reads in flight, leg 1 none")
        balancer.ended(0)
        #expect(balancer.choose(offset: offset, among: [0, 1]) == 0)
    }

    @Test func firstAlwaysReadsTheFirstLeg() {
        let balancer = ReadBalancer(policy: .first)
        balancer.started(0, offset: 0, length: 4096)
        #expect(balancer.choose(offset: 4096, among: [0, 1]) == 0)
        #expect(balancer.choose(offset: 1 << 30, among: [3, 1]) == 0)
    }
}
