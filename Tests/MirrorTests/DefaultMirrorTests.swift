import Foundation
import LibNBD
import Mirror
import TestSupport
import Testing

/// `dmio-nbd` with no arguments: the product's one command.
@Suite struct DefaultMirrorTests {
    /// Legs go in $XDG_DATA_HOME/dmio-nbd, made with the folders above it,
    /// whatever folder the command runs in.
    @Test func noArgumentsServeATwoLegMirrorThatSurvivesARestart() throws {
        let fixture = MirrorFixture()
        let data = fixture.path("fresh/data")
        let start = { () throws -> ServeProcess in
            let server = try ServeProcess(arguments: ["--socket", fixture.socket], socket: fixture.socket,
                                          subcommand: nil, directory: fixture.folder,
                                          environment: ["XDG_DATA_HOME": data])
            try server.waitUntilListening()
            return server
        }
        var server = try start()
        // Printed once the server listens, in one write ending with the status line: read once it is there.
        _ = server.prints("status:  ", within: 10)
        let printed = server.stdout()
        #expect(printed.contains("nbd-client -unix \(fixture.socket) /dev/nbd0"), "\(printed)")
        #expect(printed.contains("nbdinfo 'nbd+unix:///?socket=\(fixture.socket)'"), "\(printed)")
        #expect(printed.contains("status:  \(dmioNBDExecutable) status"), "\(printed)")
        for leg in ["leg0.img", "leg1.img"] {
            let attributes = try FileManager.default.attributesOfItem(atPath: "\(data)/dmio-nbd/\(leg)")
            #expect(attributes[.size] as? Int == 1 << 30)
        }
        #expect(!FileManager.default.fileExists(atPath: fixture.path("dmio-data")))
        let status = try fixture.status()
        #expect(status.legs.map(\.state) == [.inSync, .inSync])
        #expect(status.size == (1 << 30) - (1 << 20))
        var handle = try fixture.connect()
        let bytes = pattern(1 << 20, seed: 42)
        try handle.write(bytes, at: 100 << 20)
        handle.shutdown()
        #expect(server.stop() == 0)

        // The same mirror comes back, with its data, and is not made anew.
        server = try start()
        #expect(try fixture.status().uuid == status.uuid)
        handle = try fixture.connect()
        #expect(try handle.read(bytes.count, at: 100 << 20) == bytes)
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual("\(data)/dmio-nbd/leg0.img", "\(data)/dmio-nbd/leg1.img"))
    }

    /// Without XDG_DATA_HOME the legs go in ~/.local/share/dmio-nbd.
    @Test func withoutXDGDataHomeTheLegsGoInTheHomeFolder() throws {
        let fixture = MirrorFixture()
        let home = fixture.path("home")
        try FileManager.default.createDirectory(atPath: home, withIntermediateDirectories: false)
        let server = try ServeProcess(arguments: ["--socket", fixture.socket], socket: fixture.socket,
                                      subcommand: nil, directory: fixture.folder,
                                      environment: ["XDG_DATA_HOME": "", "HOME": home])
        try server.waitUntilListening()
        #expect(FileManager.default.fileExists(atPath: "\(home)/.local/share/dmio-nbd/leg0.img"))
        #expect(server.stop() == 0)
    }
}
