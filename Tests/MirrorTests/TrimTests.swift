import Foundation
import LibNBD
import Mirror
import TestSupport
import Testing

/// After a trim every leg reads the same, whatever its server does with a
/// discard: what a client reads must not depend on which leg serves it.
@Suite(.serialized) struct TrimTests {
    /// Trims regions 1 and 2 of four written ones; expects them to read as
    /// zeroes and the others as written.
    private func trimAndCheck(_ handle: NBDHandle, _ written: [Int: [UInt8]]) throws {
        try handle.trim(count: 2 * UInt64(testRegionBytes), offset: UInt64(testRegionBytes))
        try expectTrimmed(handle, written)
    }

    private func expectTrimmed(_ handle: NBDHandle, _ written: [Int: [UInt8]]) throws {
        let zeroes = [UInt8](repeating: 0, count: 64 << 10)
        for region in 1...2 {
            #expect(try handle.read(zeroes.count, at: UInt64(region * testRegionBytes)) == zeroes, "region \(region)")
        }
        try handle.expectReadBack(written.filter { ![1, 2].contains($0.key) })
    }

    /// qemu-nbd offers trim and, by default (--discard=ignore), does nothing
    /// with it: the leg it serves must read zeroes all the same.
    @Test func aTrimReadsAsZeroesFromALegWhoseServerIgnoresTrim() throws {
        let fixture = MirrorFixture()
        let leg0 = fixture.path("leg0.img"), remoteFile = fixture.path("leg1.img")
        try run(["truncate", "-s", "16M", leg0, remoteFile])
        let remote = try QemuNBD(file: remoteFile)
        try run([dmioNBDExecutable, "create", "--assume-clean", leg0, remote.uri])
        let server = try fixture.serve([leg0, remote.uri])
        let handle = try fixture.connect()
        #expect(try handle.canTrim())
        let written = try handle.writeRegions(0..<4, seed: 31)
        try trimAndCheck(handle, written)

        // Leg 1 alone answers now.
        try fixture.control(["fail-leg", "0"])
        try expectTrimmed(handle, written)
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(leg0, remoteFile))
    }

    /// A mirror of files offers trim; a leg put in later that can neither
    /// trim nor zero (nbdkit's eval plugin, no zero) gets zeroes written
    /// for the trims of the clients that were offered trim, and new clients
    /// are not offered it any more.
    @Test func aLegThatCannotZeroPutInLaterGetsZeroesAndEndsTheOffer() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        let server = try fixture.serve(legs + ["--create", "16M"])
        let handle = try fixture.connect()
        #expect(try handle.canTrim())
        let written = try handle.writeRegions(0..<4, seed: 32)

        let newLeg = fixture.path("new.img")
        try run(["truncate", "-s", "16M", newLeg])
        let remote = try NBDKit([
            "--filter=nozero", "eval", "get_size=echo \(16 << 20)",
            "pread=dd if=\(newLeg) skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
            "pwrite=dd of=\(newLeg) seek=$4 oflag=seek_bytes conv=notrunc status=none", "can_write=exit 0"])
        try fixture.control(["replace-leg", "1", remote.uri])
        try fixture.waitFor("the new leg in sync", timeout: 60) { $0.allInSync }
        #expect(try !fixture.connect().canTrim())

        try trimAndCheck(handle, written)
        try fixture.control(["fail-leg", "0"])
        try expectTrimmed(handle, written)
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs[0], newLeg))
    }

    /// Where a leg cannot zero, the mirror does not offer trim; a mirror of
    /// files does.
    @Test func trimIsOfferedOnlyWhenEveryLegZeroesCheaply() throws {
        let fixture = MirrorFixture()
        let leg0 = fixture.path("leg0.img"), remoteFile = fixture.path("leg1.img")
        try run(["truncate", "-s", "16M", leg0, remoteFile])
        let remote = try NBDKit(["--filter=nozero", "file", remoteFile])
        try run([dmioNBDExecutable, "create", "--assume-clean", leg0, remote.uri])
        var server = try fixture.serve([leg0, remote.uri])
        #expect(try !fixture.connect().canTrim())
        #expect(server.stop() == 0)

        let legs = [fixture.path("a.img"), fixture.path("b.img")]
        server = try fixture.serve(legs + ["--create", "16M"])
        #expect(try fixture.connect().canTrim())
        #expect(server.stop() == 0)
    }
}
