import Foundation
import Testing
@testable import Mirror

/// The region hash and the group commit on their own, without legs.
@Suite struct RegionHashTests {
    private func hash(regions: Int = 16) -> (RegionBitmap, RegionHash) {
        let bitmap = RegionBitmap(regionCount: regions)
        return (bitmap, RegionHash(regionBytes: 4096, bitmap: bitmap))
    }

    @Test func aWriteToARegionUnderCopyWaitsForTheCopyAndCountsNothingMeanwhile() {
        let (bitmap, hash) = hash()
        hash.startCopy(2..<4)
        nonisolated(unsafe) var resumed = 0
        #expect(!hash.tryStartWrite(3...3))
        #expect(hash.startWrite(3...5) { resumed += 1 } == .held)
        // Held writes neither count nor mark: the copy sees no write in flight.
        #expect(bitmap.dirtyCount == 0)
        #expect(hash.startWrite(8...8) {} == .needsCommit)
        let released = hash.endCopy(2..<4)
        #expect(released.count == 1)
        #expect(resumed == 0)
        for write in released { write() }
        #expect(resumed == 1)
    }

    @Test func aWriteHeldByTwoCopiesWaitsForBoth() {
        let (_, hash) = hash()
        hash.startCopy(0..<1)
        hash.startCopy(1..<2)
        #expect(hash.startWrite(0...1) {} == .held)
        #expect(hash.endCopy(0..<1).isEmpty)
        #expect(hash.endCopy(1..<2).count == 1)
    }

    @Test func aCopyWaitsForTheWritesInFlightToEnd() async throws {
        let (_, hash) = hash()
        #expect(hash.startWrite(4...4) {} == .needsCommit)
        let copied = Atomicish()
        let copier = Thread {
            hash.startCopy(4..<5)
            copied.set()
        }
        copier.start()
        try await Task.sleep(for: .milliseconds(200))
        #expect(!copied.isSet)
        hash.endWrite(4...4)
        for _ in 0..<100 where !copied.isSet { try await Task.sleep(for: .milliseconds(20)) }
        #expect(copied.isSet)
        #expect(hash.endCopy(4..<5).isEmpty)
    }

    @Test func theCleanerNeverClearsARegionWithAWriteInFlightOrWrittenSinceItLooked() {
        let (bitmap, hash) = hash()
        #expect(hash.startWrite(1...2) {} == .needsCommit)
        bitmap.written(bitmap.changedPages())
        hash.endWrite(1...1)
        _ = hash.idleDirtyRegions()
        _ = hash.idleDirtyRegions()
        // Region 2 still has its write; region 1 has been idle two ticks.
        let candidates = hash.idleDirtyRegions()
        #expect(candidates == [1])
        // A write to region 1 after the candidates were chosen keeps its bit.
        #expect(hash.tryStartWrite(1...1))
        #expect(hash.clearIdle(candidates) == 0)
        #expect(bitmap.dirtyRegions == [1, 2])
        // At a clean stop, only regions with writes in flight keep their bits.
        hash.endWrite(1...1)
        #expect(hash.clearAllIdle() == 1)
        #expect(bitmap.dirtyRegions == [2])
    }

    @Test func aRegionIsIdleOnlyOnceItsLastWriteEndedAndTwoTicksPassed() {
        // Regions 63 and 64 sit in two words of the bits.
        let (bitmap, hash) = hash(regions: 130)
        #expect(hash.startWrite(63...64) {} == .needsCommit)
        #expect(hash.startWrite(64...64) {} == .needsCommit)
        bitmap.written(bitmap.changedPages())
        hash.endWrite(63...64)
        #expect(hash.idleDirtyRegions() == [])
        #expect(hash.idleDirtyRegions() == [])
        #expect(hash.idleDirtyRegions() == [63])
        hash.endWrite(64...64)
        #expect(hash.idleDirtyRegions() == [63, 64])
        #expect(hash.clearIdle([63, 64]) == 2)
        #expect(bitmap.dirtyCount == 0)
    }

    @Test func aBitSetAgainDuringACommitStaysToBeWritten() {
        let (bitmap, hash) = hash()
        #expect(hash.startWrite(0...0) {} == .needsCommit)
        let carried = bitmap.changedPages()
        // The cleaner clears it and a write sets it again while the commit runs.
        #expect(bitmap.clear([0]) == 1)
        #expect(hash.startWrite(0...0) {} == .needsCommit)
        bitmap.written(carried)
        #expect(bitmap.changedPages().count == 1)
        #expect(!bitmap.isDurablyDirty(0...0))
    }
}

@Suite struct GroupCommitTests {
    /// A commit that the test ends by hand.
    final class HeldCommits: @unchecked Sendable {
        private let lock = NSLock()
        private var pending: [@Sendable (Bool, Bool) -> Void] = []
        var started: Int { lock.withLock { startedCount } }
        private var startedCount = 0

        func commit(_ done: @escaping @Sendable (Bool, Bool) -> Void) {
            lock.withLock {
                startedCount += 1
                pending.append(done)
            }
        }

        func endOne(_ durable: Bool = true) {
            let done = lock.withLock { pending.removeFirst() }
            done(durable, false)
        }
    }

    @Test func requestsDuringACommitShareTheNextOneAndNoneIsAnsweredByAnEarlierCommit() {
        let commits = HeldCommits()
        let group = GroupCommit { commits.commit($0) }
        let answers = Answers()
        group.request { answers.add("first", $0) }
        #expect(commits.started == 1)
        group.request { answers.add("second", $0) }
        group.request { answers.add("third", $0) }
        // The running commit may have missed what the later two changed.
        #expect(commits.started == 1)
        commits.endOne()
        #expect(answers.all == ["first true"])
        #expect(commits.started == 2)
        commits.endOne(false)
        #expect(answers.all == ["first true", "second false", "third false"])
        #expect(commits.started == 2)
    }

    @Test func aCommitThatChangedTheStateItWroteIsFollowedByAnother() {
        nonisolated(unsafe) var commits = 0
        let group = GroupCommit { done in
            commits += 1
            // The first commit finds a leg failing its write: that goes on record too.
            done(true, commits == 1)
        }
        nonisolated(unsafe) var answers = 0
        group.request { _ in answers += 1 }
        #expect(commits == 2)
        #expect(answers == 1)
    }

    @Test func commitsThatEndInsideTheirCallRunInALoopNotByRecursion() {
        nonisolated(unsafe) var depth = 0
        nonisolated(unsafe) var deepest = 0
        nonisolated(unsafe) var commits = 0
        nonisolated(unsafe) var group: GroupCommit!
        nonisolated(unsafe) var answered = 0
        group = GroupCommit { done in
            commits += 1
            depth += 1
            deepest = max(deepest, depth)
            // Each commit brings a request for another, as writes to new regions do.
            if commits < 1000 { group.request { _ in answered += 1 } }
            done(true, false)
            depth -= 1
        }
        group.request { _ in answered += 1 }
        #expect(commits == 1000)
        #expect(answered == 1000)
        #expect(deepest == 1)
    }

    @Test func commitAndWaitBlocksUntilACommitEnds() async throws {
        let commits = HeldCommits()
        let group = GroupCommit { commits.commit($0) }
        let waited = Atomicish()
        let waiter = Thread {
            _ = group.commitAndWait()
            waited.set()
        }
        waiter.start()
        for _ in 0..<100 where commits.started == 0 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(!waited.isSet)
        commits.endOne()
        for _ in 0..<100 where !waited.isSet { try await Task.sleep(for: .milliseconds(10)) }
        #expect(waited.isSet)
    }
}

private final class Answers: @unchecked Sendable {
    private let lock = NSLock()
    private var answers: [String] = []
    func add(_ name: String, _ durable: Bool) { lock.withLock { answers.append("\(name) \(durable)") } }
    var all: [String] { lock.withLock { answers } }
}

private final class Atomicish: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.withLock { value = true } }
    var isSet: Bool { lock.withLock { value } }
}
