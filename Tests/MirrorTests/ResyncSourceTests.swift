import Foundation
import Glibc
import LibNBD
import Mirror
import TestSupport
import Testing

/// A resync copies each run of regions from a leg that is in sync once the
/// run is held, never from one chosen before: a leg failed in between no
/// longer takes writes, and its old bytes would go over newer ones.
@Suite(.serialized) struct ResyncSourceTests {
    /// Legs 0 and 1 are files; leg 2 is nbdkit behind the pause filter. Leg
    /// 1 is rebuilt at 4 MiB/s, three runs of 4 MiB and then regions 30-31.
    /// With leg 2 paused, a write to region 30 stays in flight, so the copy
    /// of the last run waits for it while holding region 30; the operator
    /// then fails leg 0, and a write to region 31 goes to legs 1 and 2 only.
    /// Leg 1 must end with that write, not with leg 0's older bytes.
    @Test func aSourceFailedWhileARunIsHeldIsNotCopied() throws {
        let fixture = MirrorFixture()
        let leg0 = fixture.path("leg0.img"), leg1 = fixture.path("leg1.img"), remoteFile = fixture.path("leg2.img")
        try run(["truncate", "-s", "32M", leg0, leg1, remoteFile])
        let pauseSocket = fixture.path("pause.sock")
        let remote = try NBDKit(["--filter=pause", "file", remoteFile, "pause-control=\(pauseSocket)"])
        let legs = [leg0, leg1, remote.uri]
        try run([dmioNBDExecutable, "create", "--assume-clean"] + legs)
        let server = try fixture.serve(legs + ["--resync-rate", "4M"])
        let handle = try fixture.connect()

        try fixture.control(["fail-leg", "1"])
        _ = try handle.writeRegions(0..<24, seed: 40)
        _ = try handle.writeRegions(30..<32, seed: 70)
        try fixture.control(["readd-leg", "1"])

        try pauseControl(pauseSocket, "p")
        let newer = pattern(64 << 10, seed: 90), newest = pattern(64 << 10, seed: 91)
        let writes = DispatchGroup()
        inBackground(writes) { try fixture.connect().write(newer, at: UInt64(30 * testRegionBytes)) }
        try fixture.waitFor("the first three runs copied", timeout: 20) { $0.resync.regionsDone == 24 }
        // At 4 MiB a second, a 4 MiB run's wait before the last run is held
        // is at most a second.
        usleep(1_500_000)
        inBackground(writes) { try fixture.control(["fail-leg", "0"]) }
        usleep(500_000)
        inBackground(writes) { try fixture.connect().write(newest, at: UInt64(31 * testRegionBytes)) }
        usleep(500_000)
        try pauseControl(pauseSocket, "r")
        #expect(writes.wait(timeout: .now() + 20) == .success)

        let status = try fixture.waitFor("leg 1 in sync", timeout: 20) { $0.state(1) == .inSync && !$0.resync.active }
        #expect(status.legs.map(\.state) == [.degraded, .inSync, .inSync])
        handle.shutdown()
        #expect(server.stop() == 0)
        for (region, bytes) in [(30, newer), (31, newest)] {
            let offset = (1 << 20) + region * testRegionBytes
            let copy = try [UInt8](FileHandle(forReadingFrom: URL(fileURLWithPath: leg1)).readingBytes(at: offset, count: bytes.count))
            let holdsTheWrite = copy == bytes
            #expect(holdsTheWrite, "region \(region) of the rebuilt leg")
        }
    }

    /// Runs `body` on a thread of its own: the global queue runs only as
    /// many blocked bodies at once as there are cores.
    private func inBackground(_ group: DispatchGroup, _ body: @escaping @Sendable () throws -> Void) {
        group.enter()
        Thread.detachNewThread {
            defer { group.leave() }
            do { try body() } catch { Issue.record("\(error)") }
        }
    }

    /// Sends a command to the pause filter and waits for its answer: a
    /// pause is answered once the requests received before it are done.
    private func pauseControl(_ socket: String, _ command: Character) throws {
        let descriptor = try connectedUnixSocket(socket)
        defer { close(descriptor) }
        var byte = command.asciiValue!
        guard Glibc.write(descriptor, &byte, 1) == 1, read(descriptor, &byte, 1) == 1,
              byte == Character(command.uppercased()).asciiValue! else {
            throw POSIXError(.EIO)
        }
    }
}

private extension FileHandle {
    func readingBytes(at offset: Int, count: Int) throws -> Data {
        try seek(toOffset: UInt64(offset))
        return try read(upToCount: count) ?? Data()
    }
}
