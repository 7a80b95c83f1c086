import Foundation
import LibNBD
import Mirror
import TestSupport
import Testing

/// `dmio-nbd` with no arguments: the product's one command.
@Suite struct DefaultMirrorTests {
    @Test func noArgumentsServeATwoLegMirrorThatSurvivesARestart() throws {
        let fixture = MirrorFixture()
        let start = { () throws -> ServeProcess in
            let server = try ServeProcess(arguments: ["--socket", fixture.socket], socket: fixture.socket,
                                          subcommand: nil, directory: fixture.folder)
            try server.waitUntilListening()
            return server
        }
        var server = try start()
        let printed = server.stdout()
        #expect(printed.contains("nbd-client -unix \(fixture.socket) /dev/nbd0"), "\(printed)")
        #expect(printed.contains("nbdinfo 'nbd+unix:///?socket=\(fixture.socket)'"), "\(printed)")
        for leg in ["leg0.img", "leg1.img"] {
            let attributes = try FileManager.default.attributesOfItem(atPath: fixture.path("dmio-data/\(leg)"))
            #expect(attributes[.size] as? Int == 1 << 30)
        }
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
        #expect(fixture.legsEqual(fixture.path("dmio-data/leg0.img"), fixture.path("dmio-data/leg1.img")))
    }
}
