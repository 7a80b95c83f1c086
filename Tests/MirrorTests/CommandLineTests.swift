import Foundation
import Glibc
import LibNBD
import Mirror
import TestSupport
import Testing

/// The command as a person types it: mistakes get plain answers (exit 64
/// for a command line that cannot be read, 1 for a refusal) and make
/// nothing; paths are absolute; a leg tells what it is.
@Suite(.serialized) struct CommandLineTests {
    /// Runs dmio-nbd expecting it to fail; returns its exit status and words.
    private func refused(_ arguments: [String], in directory: String? = nil) -> (status: Int32, said: String) {
        do {
            let output = try run([dmioNBDExecutable] + arguments, directory: directory, timeout: 30)
            Issue.record("dmio-nbd \(arguments) succeeded: \(output)")
            return (0, output)
        } catch let failed as CommandFailed {
            return (failed.status, failed.output)
        } catch {
            Issue.record("\(error)")
            return (-1, "")
        }
    }

    @Test func versionAndMistypedCommands() throws {
        let version = try run([dmioNBDExecutable, "--version"])
        #expect(version.hasPrefix("dmio-nbd 0.6.0 (commit "), "\(version)")
        let fixture = MirrorFixture()
        let typo = refused(["stauts", "--create", "16M"], in: fixture.folder)
        #expect(typo.status == 64)
        #expect(typo.said.contains("unknown command 'stauts'; did you mean 'status'?"), "\(typo.said)")
        let asLeg = refused(["--create", "16M", "stauts"], in: fixture.folder)
        #expect(asLeg.status == 64 && asLeg.said.contains("unknown command 'stauts'"), "\(asLeg.said)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: fixture.folder).isEmpty, "nothing was made")
        #expect(refused(["version"]).said.contains("did you mean '--version'?"))
        let leg = refused(["a.img", "b.img"], in: fixture.folder)
        #expect(leg.status == 64 && leg.said.contains("a leg is given as a path, such as ./a.img"), "\(leg.said)")
        let flag = refused(["create", "--forse", "a", "b"])
        #expect(flag.status == 64 && flag.said.contains("Unknown option '--forse'"), "\(flag.said)")
        #expect(!flag.said.contains("Did you mean"), "\(flag.said)")
    }

    @Test func sizesAreReadWithEveryUnitAndRefusedAsTyped() throws {
        let fixture = MirrorFixture()
        let small = refused(["create", "--size", "100", fixture.path("a"), fixture.path("b")])
        #expect(small.status == 1)
        #expect(small.said.contains("--size 100 (100 bytes) is too small for a leg"), "\(small.said)")
        let bad = refused(["create", "--size", "10X", fixture.path("a"), fixture.path("b")])
        #expect(bad.status == 64 && bad.said.contains("'10X' is not a size: give a number of bytes, or with a unit: K, M"),
                "\(bad.said)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: fixture.folder).isEmpty)
        for (index, size) in ["16M", "16MiB", "16MB", "16m", "16384K"].enumerated() {
            let legs = [fixture.path("\(index)a"), fixture.path("\(index)b")]
            try run([dmioNBDExecutable, "create", "--size", size] + legs)
            #expect((try FileManager.default.attributesOfItem(atPath: legs[0]))[.size] as? Int == 16 << 20, "\(size)")
        }
    }

    /// A create that fails after making a leg's file removes it.
    @Test func aFailedCreateLeavesNothingBehind() throws {
        let fixture = MirrorFixture()
        let made = fixture.path("new.img")
        let failed = refused(["create", "--size", "16M", made, fixture.path("no/such/folder/leg.img")])
        #expect(failed.status == 1 && failed.said.contains("No such file or directory"), "\(failed.said)")
        #expect(!FileManager.default.fileExists(atPath: made))
    }

    /// Relative paths become absolute, for the server in another folder
    /// too; after replace-leg the old command line is refused naming the
    /// leg now in its place; examine and wipe tell and free an old leg.
    @Test func legsAreNamedByAbsolutePathsAndAReplacedLegSaysWhatReplacedIt() throws {
        let fixture = MirrorFixture()
        var server = try ServeProcess(arguments: ["a.img", "b.img", "--create", "16M", "--socket", fixture.socket],
                                      socket: fixture.socket, directory: fixture.folder)
        try server.waitUntilListening()
        #expect(try fixture.status().legs.map(\.device) == [fixture.path("a.img"), fixture.path("b.img")])
        try run(["truncate", "-s", "16M", fixture.path("c.img")])
        try run([dmioNBDExecutable, "replace-leg", "1", "c.img", "--socket", fixture.socket], directory: fixture.folder)
        try fixture.waitFor("the new leg in sync") { $0.allInSync }
        #expect(try fixture.status().legs[1].device == fixture.path("c.img"))
        let busy = refused(["wipe", fixture.path("a.img")])
        #expect(busy.said.contains("is in use by pid \(server.process.processIdentifier)"), "\(busy.said)")
        #expect(server.stop() == 0)

        let old = try fixture.serveRefused([fixture.path("a.img"), fixture.path("b.img")])
        // b.img was in sync: it served until c.img had its copy, then left.
        #expect(old.contains("\(fixture.path("b.img")) was removed from mirror")
                && old.contains("its legs, in order: \(fixture.path("a.img")) \(fixture.path("c.img"))"), "\(old)")
        let examined = try run([dmioNBDExecutable, "examine", fixture.path("c.img"), "--json"])
        let leg = try JSONDecoder().decode(LegMetadata.self, from: Data(examined.utf8))
        #expect(leg.legIndex == 1 && leg.clean && leg.legs.map(\.name) == [fixture.path("a.img"), fixture.path("c.img")])
        let readable = try run([dmioNBDExecutable, "examine", fixture.path("b.img")])
        #expect(readable.contains("Leg : removed from the mirror"), "\(readable)")

        try run([dmioNBDExecutable, "wipe", fixture.path("b.img")])
        let gone = refused(["examine", fixture.path("b.img")])
        #expect(gone.status == 1 && gone.said.contains("holds no dmio-nbd mirror metadata"), "\(gone.said)")
        server = try fixture.serve([fixture.path("a.img"), fixture.path("c.img")])
        #expect(server.stop() == 0)
    }

    /// Status says why a leg is out.
    @Test func statusSaysWhyALegIsOut() throws {
        let fixture = MirrorFixture()
        let server = try fixture.serve([fixture.path("a.img"), fixture.path("b.img"), "--create", "16M"])
        let status = try fixture.control(["fail-leg", "1"])
        #expect(status.legs[1].cause == .operator && status.legs[1].why == "operator")
        let table = try run([dmioNBDExecutable, "status", "--socket", fixture.socket])
        let line = table.split(separator: "\n").first { $0.hasPrefix("1    degraded    \(fixture.path("b.img"))") }
        #expect(line?.hasSuffix(" operator") == true, "\(table)")
        #expect(server.stop() == 0)
    }
}
