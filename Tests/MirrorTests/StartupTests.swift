import Foundation
import Glibc
import LibNBD
import Mirror
import TestSupport
import Testing

/// The start-up: sockets are bound before any leg is opened, refusals say
/// what to fix, and every mirror has a control socket of its own.
@Suite(.serialized) struct StartupTests {
    private func metadata(_ leg: String) -> Data? { FileManager.default.contents(atPath: leg)?.prefix(1 << 20) }

    @Test func aPortInUseIsRefusedBeforeAnyLegIsTouched() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        try run([dmioNBDExecutable, "create", "--size", "16M"] + legs)
        let before = legs.map(metadata)
        let busy = TCPListener()
        defer { busy.close() }
        let said = try fixture.serveRefused(legs + ["--tcp", "127.0.0.1:\(busy.port)"])
        #expect(said.contains("port \(busy.port) is in use (by pid \(getpid()) ("), "\(said)")
        #expect(!said.contains("leg 0"), "no leg was opened: \(said)")
        #expect(legs.map(metadata) == before)
    }

    /// Whoever may connect to the NBD socket may read and write the device:
    /// it is made as the umask makes files (0755 under 022), not open to all.
    @Test func theNBDSocketFollowsTheUmask() throws {
        let fixture = MirrorFixture()
        let server = try fixture.serve([fixture.path("a.img"), fixture.path("b.img"), "--create", "16M"])
        var info = stat()
        #expect(stat(fixture.socket, &info) == 0)
        let mask = umask(0o022)
        umask(mask)
        #expect(info.st_mode & 0o777 & mask == 0, "mode \(String(info.st_mode & 0o777, radix: 8)) under umask \(String(mask, radix: 8))")
        #expect(server.stop() == 0)
    }

    @Test func socketPathsThatCannotBeBoundAreRefusedPlainly() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        try run([dmioNBDExecutable, "create", "--size", "16M"] + legs)
        let before = legs.map(metadata)
        let missing = try fixture.serveRefused(legs, socket: fixture.path("no/such/folder/nbd.sock"))
        #expect(missing.contains("directory \(fixture.path("no/such/folder")) does not exist"), "\(missing)")
        let long = fixture.path(String(repeating: "x", count: 120) + ".sock")
        let tooLong = try fixture.serveRefused(legs, socket: long)
        #expect(tooLong.contains("socket path \(long) is \(long.utf8.count) bytes, at most 107"), "\(tooLong)")
        let control = try fixture.serveRefused(legs + ["--control", fixture.path("gone/x.ctl")])
        #expect(control.contains("directory \(fixture.path("gone")) does not exist"), "\(control)")
        #expect(legs.map(metadata) == before)
    }

    /// Two mirrors served on TCP only: each has its own control socket,
    /// `status` lists both, and a leg command names one of them.
    @Test func mirrorsServedOnTCPOnlyHaveAControlSocketEach() throws {
        let fixture = MirrorFixture()
        let ports = [freeTCPPort(), freeTCPPort()]
        var servers: [ServeProcess] = []
        for (index, port) in ports.enumerated() {
            let legs = [fixture.path("m\(index)-leg0.img"), fixture.path("m\(index)-leg1.img")]
            servers.append(try ServeProcess(arguments: legs + ["--create", "16M", "--tcp", "127.0.0.1:\(port)"],
                                            socket: ""))
            let deadline = Date().addingTimeInterval(20)
            while (try? NBDHandle().connect(uri: "nbd://127.0.0.1:\(port)")) == nil, Date() < deadline {
                guard servers[index].process.isRunning else {
                    Issue.record("mirror \(index) did not start: \(servers[index].stderr())")
                    return
                }
                usleep(20_000)
            }
        }
        let output = try run([dmioNBDExecutable, "status", "--json"])
        let printed = try JSONDecoder().decode(MirrorFixture.StatusOutput.self, from: Data(output.utf8))
        let uuids = ports.map { port in printed.mirrors.first { $0.served == ["127.0.0.1:\(port)"] }?.mirror.uuid }
        #expect(uuids.allSatisfy { $0 != nil }, "\(output)")
        guard let first = uuids[0] else { return }
        try run([dmioNBDExecutable, "fail-leg", "1", "--mirror", String(first.prefix(8))])
        let after = try run([dmioNBDExecutable, "status", "--mirror", first])
        #expect(after.hasPrefix("2 ") && after.contains(" AD\n"), "\(after)")
        for server in servers { #expect(server.stop() == 0) }
    }
}
