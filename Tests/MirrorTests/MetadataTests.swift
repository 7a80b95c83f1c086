@testable import Mirror
import Testing

/// The on-disk format, byte by byte: what a restart or a torn write finds.
@Suite struct MetadataTests {
    private func superblock(events: UInt64, leg: Int = 0) -> Superblock {
        Superblock(mirror: MirrorUUID(high: 1, low: 2), legIndex: leg, events: events, generation: 0x1234_5678_9abc,
                   regionBytes: 512 << 10,
                   clean: events % 2 == 0, legBytes: 64 << 20, dataOffset: 1 << 20, dataBytes: 63 << 20,
                   legs: [LegRecord(uuid: MirrorUUID(high: 3, low: 4), state: .inSync, errno: 0),
                          LegRecord(uuid: MirrorUUID(high: 5, low: 6), state: .degraded, errno: 28,
                                    failedGeneration: 0xfeed)])
    }

    @Test func aSuperblockReadsBackAsWritten() throws {
        let written = superblock(events: 7, leg: 1)
        guard case .superblock(let read) = Superblock.decode(written.encoded()) else {
            Issue.record("not decoded")
            return
        }
        #expect(read == written)
    }

    /// A leg's write-mostly and bitmap-behind flags and the cause "behind" read back.
    @Test func aWriteMostlyLegAndALegBehindReadBackAsWritten() throws {
        var written = superblock(events: 9, leg: 0)
        written.legs[0].writeMostly = true
        written.legs[0].bitmapBehind = true
        written.legs[1].cause = .behind
        guard case .superblock(let read) = Superblock.decode(written.encoded()) else {
            Issue.record("not decoded")
            return
        }
        #expect(read.legs[0].writeMostly && !read.legs[1].writeMostly)
        #expect(read.legs[0].bitmapBehind && !read.legs[1].bitmapBehind)
        // Version 3 while a leg is write-mostly, 4 while a bitmap is behind: older builds refuse it.
        #expect(written.encoded()[8] == 4 && superblock(events: 9).encoded()[8] == 2)
        var writeMostly = written
        writeMostly.legs[0].bitmapBehind = false
        #expect(writeMostly.encoded()[8] == 3)
        #expect(read.legs[1].cause == .behind)
        #expect(read == written)
    }

    @Test(arguments: [9, 100, 200, 4000, 4095])
    func anyDamagedByteIsCaught(offset: Int) {
        var bytes = superblock(events: 3).encoded()
        bytes[offset] ^= 0x10
        guard case .corrupt = Superblock.decode(bytes) else {
            Issue.record("damage at \(offset) not caught")
            return
        }
    }

    @Test func bytesWithoutTheMagicAreNoSuperblock() {
        guard case .none = Superblock.decode([UInt8](repeating: 0, count: 4096)) else {
            Issue.record("zeroes taken for a superblock")
            return
        }
    }

    @Test func theLayoutReservesAMiBAndABitmapBitPerRegion() throws {
        let layout = try MirrorLayout(legBytes: 1 << 30)
        #expect(layout.dataOffset == 1 << 20)
        #expect(layout.dataBytes == (1 << 30) - (1 << 20))
        #expect(layout.regionCount == 2046)
        #expect(layout.bitmapBytes == 4096)
        #expect(throws: MirrorError.self) { try MirrorLayout(legBytes: 1 << 20) }
        #expect(throws: MirrorError.self) { try MirrorLayout(legBytes: 1 << 30, regionBytes: 3000) }
    }

    @Test func theBitmapKeepsSetBitsUntilCleanedAndWritesWaitForThem() {
        let bitmap = RegionBitmap(regionCount: 100)
        let hash = RegionHash(regionBytes: 512 << 10, bitmap: bitmap)
        let regions = hash.regions(offset: (512 << 10) - 4096, length: 8192)
        #expect(regions == 0...1)
        // Clean: counted and marked, but its bits must be committed first.
        #expect(!hash.tryStartWrite(regions))
        #expect(hash.startWrite(regions) {} == .needsCommit)
        let pages = bitmap.changedPages()
        #expect(pages.map(\.index) == [0])
        bitmap.written(pages)
        #expect(bitmap.changedPages().isEmpty)
        // Set and durable: a second write needs no commit.
        #expect(hash.tryStartWrite(regions))
        hash.endWrite(regions)
        hash.endWrite(regions)
        #expect(bitmap.dirtyRegions == [0, 1])
        // Written in the last two ticks: not cleared yet.
        #expect(hash.idleDirtyRegions().isEmpty)
        #expect(hash.idleDirtyRegions().isEmpty)
        let candidates = hash.idleDirtyRegions()
        #expect(candidates == [0, 1])
        #expect(hash.clearIdle(candidates) == 2)
        #expect(bitmap.dirtyCount == 0)
    }

    @Test func neighbouringDirtyRegionsAreCopiedTogether() {
        #expect(RegionPass.runs(of: [1, 2, 3, 5, 6, 10], longest: 2) == [1..<3, 3..<4, 5..<7, 10..<11])
        #expect(RegionPass.runs(of: [], longest: 8).isEmpty)
    }

    /// A scrub's vote, from the legs grouped by identical copies.
    @Test func theMajorityOfThreeOrMoreWinsAndTwoLegsHaveNone() {
        #expect(Vote([[0, 1, 2]], of: 3) == .agree)
        #expect(Vote([[0], [1]], of: 2) == .firstOfTwo(winner: 0, outvoted: [1]))
        #expect(Vote([[0], [1, 2]], of: 3) == .majority(winner: 1, outvoted: [0]))
        #expect(Vote([[0, 2], [1]], of: 3) == .majority(winner: 0, outvoted: [1]))
        #expect(Vote([[0], [1], [2]], of: 3) == .none)
        #expect(Vote([[0, 1], [2, 3]], of: 4) == .none, "two against two is no majority")
        #expect(Vote([[0, 3, 4], [1], [2]], of: 5) == .majority(winner: 0, outvoted: [1, 2]))
        #expect(Vote([[0, 1], [2], [3]], of: 4) == .none, "two of four is not more than half")
        // A leg that could not be read still counts: it may hold the copy the others would agree with.
        #expect(Vote([[0], [1]], of: 3) == .none, "two copies of three legs, one unread")
        #expect(Vote([[0, 1], [2]], of: 4) == .none, "two of four, one unread")
        #expect(Vote([[0, 1], [2]], of: 3) == .majority(winner: 0, outvoted: [2]))
        #expect(Vote([[1]], of: 3) == .agree, "the one copy that could be read")
    }
}
