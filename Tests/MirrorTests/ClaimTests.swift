import Foundation
import Glibc
import LibNBD
import Mirror
import TestSupport
import Testing

/// Legs are claimed for the mirror alone, as md and dm claim theirs: what
/// a leg holds is never overwritten by a mistake, and nothing else takes a
/// leg while the mirror serves it.
@Suite(.serialized) struct ClaimTests {
    private func bytes(_ path: String, count: Int = 2 << 20) -> Data? {
        FileManager.default.contents(atPath: path)?.prefix(count)
    }

    /// `create` over a device with ext4 mounted from it: refused (EBUSY,
    /// naming the mount), with --force too, and nothing is written.
    @Test func aMountedLegIsRefusedAndUntouched() throws {
        let fixture = MirrorFixture()
        let disk0 = fixture.path("disk0"), disk1 = fixture.path("disk1")
        try run(["truncate", "-s", "64M", disk0, disk1])
        let loop0 = try LoopDevice(file: disk0), loop1 = try LoopDevice(file: disk1)
        try run(["mkfs.ext4", "-q", loop0.path])
        let mounted = try fixture.mount(loop0.path, at: "mnt")
        try Data("kept".utf8).write(to: URL(fileURLWithPath: mounted + "/file"))
        try run(["sync"])
        let before = bytes(disk0)

        for force in [[], ["--force"]] {
            let refused = #expect(throws: CommandFailed.self) {
                try run([dmioNBDExecutable, "create"] + force + [loop0.path, loop1.path])
            }
            #expect(refused?.output.contains("\(loop0.path) is in use (mounted on \(mounted))") == true,
                    "\(String(describing: refused))")
        }
        #expect(bytes(disk0) == before)
        #expect(try String(contentsOfFile: mounted + "/file", encoding: .utf8) == "kept")
    }

    /// A leg that holds a file system (a file) or swap (a block device) is
    /// refused, naming what would be destroyed, unless --force.
    @Test func aLegThatHoldsSomethingIsRefusedUnlessForced() throws {
        let fixture = MirrorFixture()
        let image = fixture.path("a.img"), other = fixture.path("b.img"), disk = fixture.path("disk")
        try run(["truncate", "-s", "64M", image, other, disk])
        try run(["mkfs.ext4", "-q", "-F", "-L", "precious", image])
        let loop = try LoopDevice(file: disk)
        try run(["mkswap", "-L", "spare", loop.path])
        let before = bytes(image)

        let refused = #expect(throws: CommandFailed.self) { try run([dmioNBDExecutable, "create", image, other]) }
        #expect(refused?.output.contains("\(image) appears to contain an ext4 file system (label \"precious\", UUID ") == true,
                "\(String(describing: refused))")
        #expect(refused?.output.contains("--force") == true)
        #expect(bytes(image) == before)
        let swap = #expect(throws: CommandFailed.self) { try run([dmioNBDExecutable, "create", other, loop.path]) }
        #expect(swap?.output.contains("\(loop.path) appears to contain swap space (label \"spare\"") == true,
                "\(String(describing: swap))")

        let made = try run([dmioNBDExecutable, "create", "--force", image, other])
        #expect(made.contains("made mirror"), "\(made)")
    }

    /// While a mirror of two loop devices is served, mkfs and mount of a leg
    /// fail, and the mirror goes on.
    @Test func servedLegsCannotBeTakenByMkfsOrMount() throws {
        let fixture = MirrorFixture()
        let disk0 = fixture.path("disk0"), disk1 = fixture.path("disk1")
        try run(["truncate", "-s", "64M", disk0, disk1])
        let loop0 = try LoopDevice(file: disk0), loop1 = try LoopDevice(file: disk1)
        try run([dmioNBDExecutable, "create", "--assume-clean", loop0.path, loop1.path])
        let server = try fixture.serve([loop0.path, loop1.path])
        let handle = try fixture.connect()
        var written = try handle.writeRegions(0..<4, seed: 41)

        #expect(throws: CommandFailed.self) { try run(["mkfs.ext4", "-q", "-F", loop1.path]) }
        #expect(throws: CommandFailed.self) { try fixture.mount(loop1.path, at: "mnt") }
        // Nor can a second server open a leg.
        let second = try fixture.serveRefused([loop1.path, "--force"], socket: fixture.path("other.sock"))
        #expect(second.contains("\(loop1.path) is in use (open by pid \(server.process.processIdentifier) (dmio-nbd))"),
                "\(second)")

        #expect(try fixture.status().dmsetupLine.hasSuffix(" AA"))
        // A leg taken out and put back is claimed again.
        try fixture.control(["fail-leg", "1"])
        written.merge(try handle.writeRegions(4..<6, seed: 42)) { $1 }
        try fixture.control(["readd-leg", "1"])
        try fixture.waitFor("leg 1 in sync") { $0.allInSync }
        #expect(throws: CommandFailed.self) { try run(["mkfs.ext4", "-q", "-F", loop1.path]) }
        try handle.expectReadBack(written)
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(disk0, disk1))
    }

    /// Serving a leg raw (--force, --read-only too) takes the mirror's lock:
    /// refused while the mirror runs, naming its pid. The lock file holds
    /// the holder's pid and goes at a clean stop.
    @Test func aLegServedRawTakesItsMirrorsLock() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        var server = try fixture.serve(legs + ["--create", "16M"])
        let uuid = try fixture.status().uuid
        var info = stat()
        let lockFolder = stat("/run/lock", &info) == 0 && info.st_mode & 0o1777 == 0o1777 ? "/run/lock" : "/tmp"
        let lockFile = "\(lockFolder)/dmio-nbd-\(uuid).lock"
        let pid = server.process.processIdentifier
        #expect(try String(contentsOfFile: lockFile, encoding: .utf8) == "\(pid)\n")

        for readOnly in [[], ["--read-only"]] {
            let refused = try fixture.serveRefused([legs[0], "--force"] + readOnly, socket: fixture.path("raw.sock"))
            #expect(refused.contains("mirror \(uuid) is in use by pid \(pid)"), "\(refused)")
        }
        #expect(server.stop() == 0)
        #expect(!FileManager.default.fileExists(atPath: lockFile))

        // And the other way round: the mirror waits for the raw server.
        server = try fixture.serve([legs[0], "--force", "--read-only"])
        let refused = try fixture.serveRefused(legs, socket: fixture.path("mirror.sock"))
        #expect(refused.contains("mirror \(uuid) is in use by pid \(server.process.processIdentifier)"), "\(refused)")
        #expect(server.stop() == 0)
        #expect(!FileManager.default.fileExists(atPath: lockFile))
    }
}
