import BlockTargets
import Foundation
import LibNBD
import TestSupport
import Testing

/// The standard clients against the server: nbdinfo, nbdcopy, qemu-img, fio.
@Suite struct InteropTests {
    @Test func nbdinfoSeesSizeFlagsBlockSizesAndContexts() async throws {
        try await withServer(size: 64 << 20, name: "leg0") { server in
            let json = try run(["nbdinfo", "--json", "nbd+unix:///leg0?socket=\(server.socket)"], environment: toolEnvironment)
            let info = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
            let export = try #require((info["exports"] as? [[String: Any]])?.first)
            #expect(export["export-size"] as? Int == 64 << 20)
            #expect(export["is_read_only"] as? Bool == false)
            #expect(export["can_flush"] as? Bool == true)
            #expect(export["can_fua"] as? Bool == true)
            #expect(export["can_trim"] as? Bool == true)
            #expect(export["can_zero"] as? Bool == true)
            #expect(export["can_fast_zero"] as? Bool == true)
            #expect(export["can_multi_conn"] as? Bool == true)
            #expect(export["block_size_minimum"] as? Int == 512)
            #expect(export["block_size_preferred"] as? Int == 4096)
            #expect(export["block_size_maximum"] as? Int == 32 << 20)
            #expect((export["contexts"] as? [String])?.contains("base:allocation") == true)
            #expect(export["description"] as? String == "test leg")
        }
    }

    @Test func nbdcopyRoundTripKeepsEveryByte() async throws {
        try await withServer(size: 32 << 20) { server in
            let folder = server.folder
            let source = folder + "/source.img"
            let back = folder + "/back.img"
            // Data with holes: nbdcopy must keep both.
            try run(["dd", "if=/dev/urandom", "of=\(source)", "bs=1M", "count=8", "status=none"])
            try run(["truncate", "-s", "32M", source])
            try run(["dd", "if=/dev/urandom", "of=\(source)", "bs=1M", "seek=20", "count=3", "conv=notrunc", "status=none"])
            try run(["nbdcopy", source, server.uri], environment: toolEnvironment)
            try run(["nbdcopy", server.uri, back], environment: toolEnvironment)
            #expect(try run(["sha256sum", source]).prefix(64) == run(["sha256sum", back]).prefix(64))
            #expect(try run(["cmp", source, server.legPath]).isEmpty)
        }
    }

    @Test func qemuImgComparesTheExportWithItsFile() async throws {
        try await withServer(size: 16 << 20) { server in
            let nbd = try server.connect()
            try nbd.write(pattern(3 << 20, seed: 5), at: 1 << 20)
            try nbd.flush()
            let output = try run(["qemu-img", "compare", "-f", "raw", "-F", "raw", server.legPath,
                                  "nbd+unix:///?socket=\(server.socket)"])
            #expect(output.contains("Images are identical"))
        }
    }

    @Test func fioWithVerifyFindsEveryBlockIntact() async throws {
        try await withServer(size: 64 << 20) { server in
            try run(["fio", "--name=verify", "--ioengine=nbd", "--uri=\(server.uri)", "--rw=randwrite",
                     "--bs=4k", "--iodepth=32", "--size=32M", "--verify=crc32c", "--do_verify=1",
                     "--verify_fatal=1", "--verify_state_save=0", "--output-format=terse"])
            try run(["fio", "--name=seq", "--ioengine=nbd", "--uri=\(server.uri)", "--rw=write",
                     "--bs=1M", "--iodepth=8", "--size=32M", "--offset=32M", "--verify=md5",
                     "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=terse"])
        }
    }
}
