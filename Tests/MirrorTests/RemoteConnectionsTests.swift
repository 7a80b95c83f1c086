import Foundation
import TestSupport
import Testing

/// A remote leg on several connections (NBD multi-conn): `connections=N`
/// in its URI, `--remote-connections`, and the default (four where the
/// server offers multi-conn, else one), seen from nbdkit's side: the
/// connections its socket has open, and which of them carried writes.
@Suite(.serialized) struct RemoteConnectionsTests {
    /// A mirror, in sync, of a local leg 0 and leg 1 a file that nbdkit
    /// serves with `filter` and its parameters (made as files first, so
    /// that nbdkit sees no connection but the server's), logging requests.
    private struct RemoteMirror {
        let leg0: String
        let remoteFile: String
        let remote: NBDKit
        let requestLog: String

        init(_ fixture: MirrorFixture, filter: [String] = []) throws {
            leg0 = fixture.path("leg0.img")
            remoteFile = fixture.path("leg1.img")
            requestLog = fixture.path("nbdkit-requests.log")
            try run(["truncate", "-s", "64M", leg0, remoteFile])
            try run([dmioNBDExecutable, "create", "--assume-clean", leg0, remoteFile])
            let (name, parameters) = (filter.prefix(1).map { "--filter=\($0)" }, filter.dropFirst())
            remote = try NBDKit(["--filter=log"] + name + ["file", remoteFile, "logfile=\(requestLog)"] + parameters)
        }

        func legs(_ parameters: String = "") -> [String] { [leg0, remote.uri + parameters] }

        /// The connections open at nbdkit, as its log tells them (each
        /// `Connect` less each `Disconnect`), once the mirror serves (the
        /// server listens before its legs are open, and a client's handshake
        /// waits for them) and they are `expected`, or 5 s have passed. Not
        /// /proc/net/unix: read while other tests open and close sockets, it
        /// listed fewer than the server had opened (CI, twice: 2 and 3 of 4).
        func openConnections(_ fixture: MirrorFixture, waitingFor expected: Int) throws -> Int {
            try fixture.connect().shutdown()
            let deadline = Date().addingTimeInterval(5)
            var open = NBDKitLog(path: requestLog).openConnections
            while open != expected && Date() < deadline {
                usleep(50_000)
                open = NBDKitLog(path: requestLog).openConnections
            }
            return open
        }

        /// The nbdkit connections (its log's connection=N) that carried writes.
        var connectionsThatWrote: Set<Int> { Set(NBDKitLog(path: requestLog).requests("Write").map(\.connection)) }
    }

    @Test func aRemoteLegOnFourConnectionsTakesVerifiedWritesFromManyClients() throws {
        let fixture = MirrorFixture()
        let legs = try RemoteMirror(fixture)
        let server = try fixture.serve(legs.legs("&connections=4"))
        let open = try legs.openConnections(fixture, waitingFor: 4)
        #expect(open == 4)
        // Four clients, each writing and verifying a quarter of the mirror.
        try run(["fio", "--name=verify", "--ioengine=nbd", "--uri=\(fixture.uri)", "--rw=randwrite", "--bs=4k-128k",
                 "--iodepth=16", "--numjobs=4", "--size=15M", "--offset_increment=15M", "--verify=crc32c",
                 "--verify_state_save=0", "--randrepeat=0", "--output=/dev/null"])
        #expect(try fixture.status().allInSync)
        #expect(legs.connectionsThatWrote.count == 4, "\(legs.connectionsThatWrote)")
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs.leg0, legs.remoteFile))
        #expect(server.stderr().contains("opened (NBD export, 4 connections, 64 MiB)"))
    }

    /// Without multi-conn a server may cache writes per connection: one
    /// connection however many are asked for, and a warning that says why.
    @Test func aServerWithoutMultiConnGetsOneConnectionAndAWarning() throws {
        let fixture = MirrorFixture()
        let legs = try RemoteMirror(fixture, filter: ["multi-conn", "multi-conn-mode=disable"])
        let server = try fixture.serve(legs.legs("&connections=4"))
        let open = try legs.openConnections(fixture, waitingFor: 1)
        #expect(open == 1)
        let handle = try fixture.connect()
        let written = try handle.writeRegions(0..<8, seed: 51)
        try handle.flush()
        try handle.expectReadBack(written)
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(fixture.legsEqual(legs.leg0, legs.remoteFile))
        let log = server.stderr()
        #expect(log.contains("4 connections asked for, but the server does not offer multi-conn: one connection "
                             + "(without it, a flush on one connection would not cover writes acknowledged on another)"),
                "\(log)")
        #expect(log.contains("opened (NBD export, 1 connection, 64 MiB)"))
    }

    /// Four by default where the server offers multi-conn;
    /// --remote-connections says otherwise for every remote leg.
    @Test func fourConnectionsByDefaultAndTheOptionSetsAnother() throws {
        let fixture = MirrorFixture()
        let legs = try RemoteMirror(fixture)
        for (arguments, expected) in [([String](), 4), (["--remote-connections", "2"], 2)] {
            let server = try fixture.serve(legs.legs() + arguments)
            let open = try legs.openConnections(fixture, waitingFor: expected)
            #expect(server.stop() == 0)
            // The log says how many connections each remote leg opened, and why not more.
            #expect(open == expected, "\(arguments): \(server.stderr())")
        }
    }

    @Test func aBadConnectionCountIsRefusedBeforeAnyLegIsOpened() throws {
        let fixture = MirrorFixture()
        let leg = "nbd+unix:///?socket=\(fixture.path("none.sock"))&connections=0"
        let refused = try fixture.serveRefused([fixture.path("leg0.img"), leg])
        #expect(refused.contains("leg \(leg): connections=0: the connections to a remote device are a number from 1 to 16"),
                "\(refused)")
        let option = try fixture.serveRefused(["--remote-connections", "17", fixture.path("leg0.img"), fixture.path("leg1.img")])
        #expect(option.contains("--remote-connections: 17 is not a number of connections from 1 to 16"), "\(option)")
    }

    /// A server whose connections disagree on the export's size (nbdkit's
    /// sh plugin, one size larger at each connection) is not one export:
    /// refused, not used.
    @Test func connectionsThatDisagreeOnTheSizeAreRefused() throws {
        let fixture = MirrorFixture()
        let script = fixture.path("growing.sh")
        let counter = fixture.path("connections")
        try """
            #!/bin/sh
            case "$1" in
                get_size) n=$(cat \(counter) 2>/dev/null || echo 0); echo $((n + 1)) > \(counter); echo $(((64 + n) << 20)) ;;
                can_multi_conn) exit 0 ;;
                pread) dd if=/dev/zero bs="$3" count=1 2>/dev/null ;;
                *) exit 2 ;;
            esac
            """.write(toFile: script, atomically: true, encoding: .utf8)
        chmod(script, 0o755)
        let remote = try NBDKit(["sh", script])
        do {
            try run([dmioNBDExecutable, "examine", remote.uri])
            Issue.record("examine opened a remote device whose connections disagree on its size")
        } catch let failure as CommandFailed {
            #expect(failure.output.contains("finds an export of"), "\(failure.output)")
            #expect(failure.output.contains("not the same export"), "\(failure.output)")
        }
    }
}
