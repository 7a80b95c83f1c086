import BlockTargets
import DMIO
import Foundation
import LibNBD
@testable import NBD
import TestSupport
import Testing

/// The server as libnbd sees it: every command, option and flag, data
/// checked byte for byte.
@Suite struct ServerTests {
    @Test func theExportTellsTheTruthAboutItself() async throws {
        try await withServer(size: 64 << 20) { server in
            let nbd = try server.connect()
            #expect(try nbd.size() == 64 << 20)
            #expect(try nbd.isReadOnly() == false)
            #expect(try nbd.canFlush())
            #expect(try nbd.canFUA())
            #expect(try nbd.canTrim())
            #expect(try nbd.canZero())
            #expect(try nbd.canFastZero())
            #expect(try nbd.canCache())
            #expect(try nbd.canMultiConn())
            #expect(try nbd.structuredRepliesNegotiated())
            #expect(try nbd.blockSize(.minimum) == 512)
            #expect(try nbd.blockSize(.preferred) == 4096)
            #expect(try nbd.blockSize(.maximum) == 32 << 20)
        }
    }

    @Test(arguments: [true, false])
    func writesReadBackByteForByte(structuredReplies: Bool) async throws {
        try await withServer { server in
            let nbd = try server.connect { try $0.setRequestStructuredReplies(structuredReplies) }
            #expect(try nbd.structuredRepliesNegotiated() == structuredReplies)
            for (index, (offset, count)) in [(0, 512), (4096, 4096), (1 << 20, 1 << 20), (3 << 20, 32 << 20),
                                             (64 << 20 - 8192, 8192)].enumerated() {
                let data = pattern(count, seed: UInt8(index))
                try nbd.write(data, at: UInt64(offset))
                #expect(try nbd.read(count, at: UInt64(offset)) == data, "\(count) bytes at \(offset)")
            }
            try nbd.flush()
            // What the client wrote is what the file holds.
            let data = pattern(4096, seed: 1)
            let file = try FileHandle(forReadingFrom: URL(fileURLWithPath: server.legPath))
            try file.seek(toOffset: 4096)
            #expect(Array(try file.read(upToCount: 4096)!) == data)
        }
    }

    @Test func fuaFlushTrimZeroAndCache() async throws {
        try await withServer { server in
            let nbd = try server.connect()
            let data = pattern(1 << 20, seed: 9)
            try nbd.write(data, at: 0, flags: .fua)
            try nbd.flush()
            try nbd.trim(count: 65536, offset: 0)
            #expect(try nbd.read(65536, at: 0) == [UInt8](repeating: 0, count: 65536))
            try nbd.zero(count: 65536, offset: 65536, flags: .noHole)
            #expect(try nbd.read(65536, at: 65536) == [UInt8](repeating: 0, count: 65536))
            try nbd.zero(count: 65536, offset: 131072, flags: [.fua])
            #expect(try nbd.read(65536, at: 131072) == [UInt8](repeating: 0, count: 65536))
            #expect(try nbd.read(4096, at: 196608) == Array(data[196608..<200704]), "the rest is untouched")
            try nbd.zero(count: 4096, offset: 0, flags: .fastZero)
            // Zeroing that must stay allocated may have to write: not fast.
            expectNBDError(ENOTSUP) { try nbd.zero(count: 4096, offset: 0, flags: [.fastZero, .noHole]) }
        }
    }

    @Test func blockStatusReportsHolesAndData() async throws {
        try await withServer(size: 8 << 20) { server in
            let nbd = try server.connect { try $0.addMetaContext("base:allocation") }
            #expect(try nbd.canMetaContext("base:allocation"))
            try nbd.write(pattern(1 << 20, seed: 3), at: 2 << 20)
            let status = try nbd.blockStatus(count: 8 << 20, offset: 0)
            let extents = try #require(status["base:allocation"])
            #expect(extents == [NBDExtent(length: 2 << 20, flags: 3), NBDExtent(length: 1 << 20, flags: 0),
                                NBDExtent(length: 5 << 20, flags: 3)])
            let one = try nbd.blockStatus(count: 8 << 20, offset: 0, flags: .reqOne)
            #expect(one["base:allocation"] == [NBDExtent(length: 2 << 20, flags: 3)])
        }
    }

    /// Each extent costs the event loop a file-system walk: a reply stops at
    /// a fixed number of them (the spec lets it cover less than asked), and
    /// the client asks again from where it ended.
    @Test func blockStatusRepliesCarryABoundedNumberOfExtents() async throws {
        try await withServer(size: 16 << 20) { server in
            let nbd = try server.connect { try $0.addMetaContext("base:allocation") }
            // Data in every other 4 KiB block: 4096 extents in 16 MiB.
            for block in stride(from: 0, to: 4096, by: 2) { try nbd.write(pattern(4096, seed: 1), at: UInt64(block) * 4096) }
            let extents = try #require(try nbd.blockStatus(count: 16 << 20, offset: 0)["base:allocation"])
            #expect(extents.count == TransmissionHandler.maxExtentsPerReply)
            #expect(extents.allSatisfy { $0.length == 4096 })
            #expect(extents.first?.flags == 0 && extents[1].flags == 3)
        }
    }

    @Test func aHoleIsReadAsZeroes() async throws {
        try await withServer(size: 8 << 20) { server in
            let nbd = try server.connect()
            #expect(try nbd.read(4 << 20, at: 1 << 20) == [UInt8](repeating: 0, count: 4 << 20))
        }
    }

    @Test func optionsAnswerAsTheSpecSays() async throws {
        try await withServer(name: "leg0") { server in
            let nbd = try NBDHandle()
            try nbd.setOptionMode(true)
            try nbd.connect(unixSocket: server.socket, exportName: "")
            let list = try nbd.optList()
            #expect(list.map(\.name) == ["leg0"])
            #expect(list.map(\.description) == ["test leg"])
            #expect(try nbd.optListMetaContext() == ["base:allocation"])
            try nbd.setExportName("no-such-export")
            #expect(throws: NBDError.self) { try nbd.optInfo() }
            try nbd.setExportName("leg0")
            try nbd.setFullInfo(true)
            try nbd.optInfo()
            #expect(try nbd.size() == 64 << 20)
            #expect(try nbd.exportDescription() == "test leg")
            try nbd.optGo()
            #expect(try nbd.read(512, at: 0) == [UInt8](repeating: 0, count: 512))
        }
    }

    @Test func theDefaultExportAnswersTheEmptyName() async throws {
        try await withServer(name: "leg0") { server in
            let nbd = try server.connect(exportName: "")
            #expect(try nbd.size() == 64 << 20)
            #expect(throws: NBDError.self) { _ = try server.connect(exportName: "other") }
        }
    }

    @Test func abortEndsTheHandshakeCleanly() async throws {
        try await withServer { server in
            let nbd = try NBDHandle()
            try nbd.setOptionMode(true)
            try nbd.connect(unixSocket: server.socket)
            try nbd.optAbort()
            // The server still serves others.
            #expect(try server.connect().size() == 64 << 20)
        }
    }

    @Test func aReadOnlyExportRefusesWrites() async throws {
        try await withServer(readOnly: true) { server in
            let nbd = try server.connect { try $0.setStrictMode(0) }
            #expect(try nbd.isReadOnly())
            #expect(try nbd.canTrim() == false)
            expectNBDError(EPERM) { try nbd.write(pattern(4096, seed: 1), at: 0) }
            expectNBDError(EPERM) { try nbd.trim(count: 4096, offset: 0) }
            expectNBDError(EPERM) { try nbd.zero(count: 4096, offset: 0) }
            #expect(try nbd.read(4096, at: 0).count == 4096)
        }
    }

    /// A careless client (libnbd's own checks off) gets the errors the spec names.
    @Test func badRequestsGetTheSpecsErrors() async throws {
        try await withServer(size: 1 << 20) { server in
            let nbd = try server.connect { try $0.setStrictMode(0) }
            expectNBDError(EINVAL) { _ = try nbd.read(4096, at: 1 << 20) }
            expectNBDError(EINVAL) { _ = try nbd.read(4096, at: UInt64.max - 100) }
            expectNBDError(ENOSPC) { try nbd.write(pattern(4096, seed: 1), at: (1 << 20) - 512) }
            expectNBDError(EINVAL) { _ = try nbd.read(100, at: 0) }
            expectNBDError(EINVAL) { try nbd.write(pattern(512, seed: 1), at: 3) }
            expectNBDError(EINVAL) { try nbd.trim(count: 4096, offset: 1 << 20) }
            // Nothing of the refused requests reached the file, and the
            // connection still works.
            #expect(try nbd.read(4096, at: (1 << 20) - 4096) == [UInt8](repeating: 0, count: 4096))
        }
    }

    @Test func manyConnectionsShareOneTarget() async throws {
        try await withServer(size: 16 << 20) { server in
            let handles = try (0..<8).map { _ in try server.connect() }
            DispatchQueue.concurrentPerform(iterations: handles.count) { index in
                for round in 0..<50 {
                    let offset = UInt64((index * 50 + round) * 8192)
                    let data = pattern(8192, seed: UInt8(truncatingIfNeeded: index &* 50 &+ round))
                    do {
                        try handles[index].write(data, at: offset)
                        #expect(try handles[(index + 1) % handles.count].read(8192, at: offset) == data)
                    } catch {
                        Issue.record("\(error)")
                    }
                }
            }
        }
    }
}
