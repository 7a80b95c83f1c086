import Foundation
import LibNBD
import TestSupport
import Testing

/// `dmio-nbd serve --tls`, with certificates and keys made for each test,
/// against libnbd's tools, qemu-img and nbdkit.
@Suite struct TLSTests {
    private let certificates: TestCertificates
    private let dir: String
    private var socket: String { dir + "/nbd.sock" }
    private var leg: String { dir + "/leg.img" }

    init() throws {
        certificates = try TestCertificates()
        var template = Array("/tmp/dmio-tls-XXXXXX".utf8CString)
        dir = String(cString: mkdtemp(&template)!)
    }

    /// One file served, over TLS as `tls` says.
    private func serve(_ tls: [String], waitWith client: NBDTLSOptions? = nil, tcp: Int? = nil) throws -> ServeProcess {
        let listen = tcp.map { ["--tcp", "127.0.0.1:\($0)"] } ?? []
        let server = try ServeProcess(arguments: ["--socket", socket, "--create", "8M", leg] + listen + tls,
                                      socket: socket)
        try server.waitUntilListening(tls: client ?? certificates.clientTLS())
        return server
    }

    private func tlsURI(_ query: String) -> String { "nbds+unix:///?socket=\(socket)&\(query)" }

    /// A connection with libnbd's settings `tls`, or its error.
    private func connect(_ tls: NBDTLSOptions) -> Result<NBDHandle, NBDError> {
        Result { () throws(NBDError) -> NBDHandle in
            let handle = try NBDHandle()
            try handle.setTLS(tls)
            try handle.connect(uri: "nbds+unix:///?socket=\(socket)")
            return handle
        }
    }

    private func expectRefused(_ arguments: [String], saying words: String,
                               sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            try run(arguments, environment: toolEnvironment, timeout: 20)
            Issue.record("\(arguments.joined(separator: " ")) got in", sourceLocation: sourceLocation)
        } catch let failed as CommandFailed {
            #expect(failed.output.contains(words), "\(failed.output)", sourceLocation: sourceLocation)
        } catch {
            Issue.record("\(error)", sourceLocation: sourceLocation)
        }
    }

    @Test func underRequireAPlaintextClientIsRefusedAndATLSClientServed() throws {
        let server = try serve(["--tls=require", "--tls-certificates", certificates.server])
        // libnbd's words for NBD_REP_ERR_TLS_REQD.
        expectRefused(["nbdinfo", "nbd+unix:///?socket=\(socket)"], saying: "TLS")
        let info = try run(["nbdinfo", "--size", tlsURI("tls-certificates=\(certificates.client)")],
                           environment: toolEnvironment)
        #expect(info == "\(8 << 20)")
        let handle = try connect(certificates.clientTLS()).get()
        #expect(handle.tlsNegotiated)
        #expect(server.stop() == 0)
    }

    /// What nbdcopy writes over TLS, nbdcopy and qemu-img read back over
    /// TLS, on a unix socket and on TCP (where the certificate's name is
    /// checked against the host's).
    @Test func libnbdToolsAndQemuImgWriteAndReadOverTLS() throws {
        let port = 21000 + Int(getpid() % 20000)
        let server = try serve(["--tls=require", "--tls-certificates", certificates.server], tcp: port)
        let data = dir + "/data.img"
        try Data(pattern(8 << 20, seed: 9)).write(to: URL(fileURLWithPath: data))
        let clientQuery = "tls-certificates=\(certificates.client)"
        try run(["nbdcopy", data, tlsURI(clientQuery)], environment: toolEnvironment)
        try run(["nbdcopy", "nbds://localhost:\(port)/?\(clientQuery)", dir + "/back.img"], environment: toolEnvironment)
        try run(["qemu-img", "convert", "--object", "tls-creds-x509,id=tls0,dir=\(certificates.client),endpoint=client",
                 "--image-opts", "driver=nbd,server.type=unix,server.path=\(socket),tls-creds=tls0,tls-hostname=localhost",
                 "-O", "raw", dir + "/qemu.img"])
        let expected = try Data(contentsOf: URL(fileURLWithPath: data))
        #expect(try Data(contentsOf: URL(fileURLWithPath: dir + "/back.img")) == expected)
        #expect(try Data(contentsOf: URL(fileURLWithPath: dir + "/qemu.img")) == expected)
        #expect(server.stop() == 0)
    }

    /// --tls-verify-peer: a client certificate our CA signed gets in; one
    /// from another CA, or none, is refused, with a line in the log, and
    /// costs the server nothing.
    @Test func verifyPeerTakesOnlyCertificatesOurCASigned() throws {
        let server = try serve(["--tls=require", "--tls-certificates", certificates.server, "--tls-verify-peer"])
        let noCertificate = dir + "/ca-only"
        try FileManager.default.createDirectory(atPath: noCertificate, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: certificates.client + "/ca-cert.pem", toPath: noCertificate + "/ca-cert.pem")
        for refused in [certificates.stranger, noCertificate] {
            guard case .failure = connect(certificates.clientTLS(refused)) else {
                Issue.record("a client with \(refused) got in")
                continue
            }
        }
        let handle = try connect(certificates.clientTLS()).get()
        try handle.write(pattern(4096, seed: 3), at: 0)
        #expect(try handle.read(4096, at: 0) == pattern(4096, seed: 3))
        handle.shutdown()
        #expect(server.stop() == 0)
        #expect(server.stderr().contains("TLS handshake failed"), "\(server.stderr())")
    }

    @Test func preSharedKeysLetTheirUserIn() throws {
        let psk = NBDTLSOptions(pskFile: certificates.psk, username: TestCertificates.pskUser)
        let server = try serve(["--tls=require", "--tls-psk", certificates.psk], waitWith: psk)
        let uri = "nbds+unix://\(TestCertificates.pskUser)@/?socket=\(socket)&tls-psk-file=\(certificates.psk)"
        #expect(try run(["nbdinfo", "--size", uri], environment: toolEnvironment) == "\(8 << 20)")
        guard case .failure = connect(NBDTLSOptions(pskFile: certificates.wrongPSK, username: TestCertificates.pskUser)) else {
            Issue.record("a wrong key got in")
            return
        }
        guard case .failure = connect(NBDTLSOptions(pskFile: certificates.psk, username: "mallory")) else {
            Issue.record("an unknown user got in")
            return
        }
        #expect(server.stop() == 0)
    }

    /// A client that asks for TLS and then says nothing holds no event loop:
    /// others are served meanwhile.
    @Test func aClientThatStopsMidHandshakeHoldsNothingUp() throws {
        let server = try serve(["--tls=on", "--tls-certificates", certificates.server])
        var stalled: [Int32] = []
        for _ in 0..<4 {
            let descriptor = try connectedUnixSocket(socket)
            var start: [UInt8] = [0, 0, 0, 1] + Array("IHAVEOPT".utf8) + [0, 0, 0, 5, 0, 0, 0, 0]
            #expect(write(descriptor, &start, start.count) == start.count)
            stalled.append(descriptor)
        }
        defer { stalled.forEach { close($0) } }
        let began = Date()
        let handle = try connect(certificates.clientTLS()).get()
        try handle.write(pattern(65536, seed: 5), at: 0)
        #expect(try handle.read(65536, at: 0) == pattern(65536, seed: 5))
        #expect(Date().timeIntervalSince(began) < 10)
        // A plaintext client is still served under --tls=on.
        let plain = try NBDHandle()
        try plain.connect(unixSocket: socket)
        #expect(try plain.read(65536, at: 0) == pattern(65536, seed: 5))
        #expect(server.stop() == 0)
    }

    @Test func tlsMisconfigurationsAreClearErrors() throws {
        let cases: [([String], String)] = [
            (["--tls-certificates", certificates.server], "--tls-certificates needs --tls=on or --tls=require"),
            (["--tls=require", "--tls-certificates", dir], "cannot read \(dir)/server-cert.pem: No such file or directory"),
            (["--tls=require", "--tls-certificates", certificates.server, "--tls-psk", certificates.psk],
             "--tls-psk uses pre-shared keys instead of certificates"),
            (["--tls=require", "--tls-psk", certificates.server + "/server-cert.pem"], "is not username:hexkey"),
        ]
        for (arguments, words) in cases {
            let server = try ServeProcess(arguments: ["--socket", socket, "--create", "8M", leg] + arguments, socket: socket)
            server.process.waitUntilExit()
            #expect(server.process.terminationStatus != 0, "\(arguments)")
            #expect(server.stderr().contains(words), "\(arguments): \(server.stderr())")
        }
        #expect(!FileManager.default.fileExists(atPath: leg), "nothing is made before the credentials are read")
    }

    @Test func tcpWithoutRequiredTLSIsWarnedAbout() throws {
        let port = 22000 + Int(getpid() % 20000)
        let server = try ServeProcess(arguments: ["--socket", socket, "--create", "8M", leg, "--tcp", "127.0.0.1:\(port)"],
                                      socket: socket)
        try server.waitUntilListening()
        #expect(server.stop() == 0)
        #expect(server.stderr().contains("TCP port \(port) without --tls=require: anyone who can reach it can read and write the device"),
                "\(server.stderr())")
    }

    /// A leg behind `nbdkit --tls=require` is mirrored over TLS and holds
    /// what was written; a leg whose certificate does not verify cannot be
    /// opened, and says why.
    @Test func aRemoteLegOverTLSIsMirrored() throws {
        let remoteFile = dir + "/remote.img"
        try run(["truncate", "-s", "64M", remoteFile, leg])
        let remote = try NBDKit(["--tls=require", "--tls-certificates=\(certificates.server)", "file", remoteFile],
                                tls: certificates.clientTLS())
        let remoteURI = "nbds+unix:///?socket=\(remote.socket)"
        let legTLS = ["--remote-tls-certificates", certificates.client]
        try run([dmioNBDExecutable, "create", "--assume-clean", leg, remoteURI] + legTLS)
        let server = try ServeProcess(arguments: ["--socket", socket, leg, remoteURI] + legTLS, socket: socket)
        try server.waitUntilListening()
        let handle = try NBDHandle()
        try handle.connect(unixSocket: socket)
        let data = pattern(1 << 20, seed: 11)
        try handle.write(data, at: 4 << 20, flags: .fua)
        #expect(try handle.read(1 << 20, at: 4 << 20) == data)
        handle.shutdown()
        #expect(server.stop() == 0)
        let status = try run([dmioNBDExecutable, "examine", "--json", remoteURI] + legTLS)
        #expect(status.contains("\"mirror\""), "\(status)")
        // The remote file holds the data, after the leg's metadata.
        let dataOffset = try dataStart(of: leg)
        let held = try FileHandle(forReadingFrom: URL(fileURLWithPath: remoteFile))
        try held.seek(toOffset: dataOffset + (4 << 20))
        #expect(Array(try held.read(upToCount: 1 << 20) ?? Data()) == data)

        // libnbd checks a server's certificate over TCP only (over a unix
        // socket the peer is this machine's). A free port, and nbdkit seen
        // to serve on it: another process may take it first.
        var tcpURI = ""
        var tcpRemote = Process()
        // SIGKILL: the test's threads block SIGTERM, and nbdkit, started
        // from one of them, inherits the mask (it would outlive the test).
        func stop(_ process: Process) {
            // Only a process that runs: the pid of one never started is 0,
            // and kill(0) would be this test's whole process group.
            guard process.isRunning else { return }
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        defer { stop(tcpRemote) }
        serving: for _ in 0..<3 {
            let port = freeTCPPort()
            tcpRemote = Process()
            tcpRemote.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            tcpRemote.arguments = ["nbdkit", "--foreground", "--exit-with-parent", "-p", "\(port)", "--tls=require",
                                   "--tls-certificates=\(certificates.server)", "file", remoteFile]
            tcpRemote.standardError = FileHandle.nullDevice
            try tcpRemote.run()
            tcpURI = "nbds://localhost:\(port)/"
            for _ in 0..<100 where tcpRemote.isRunning {
                if (try? run(["nbdinfo", "--size", tcpURI + "?tls-certificates=\(certificates.client)"])) != nil {
                    break serving
                }
                usleep(50_000)
            }
            stop(tcpRemote)
        }
        try run([dmioNBDExecutable, "examine", tcpURI] + legTLS)
        do {
            try run([dmioNBDExecutable, "examine", tcpURI, "--remote-tls-certificates", certificates.foreign])
            Issue.record("a leg whose certificate our CA did not sign was opened")
        } catch let failed as CommandFailed {
            #expect(failed.output.contains(tcpURI), "\(failed.output)")
            #expect(failed.output.contains("certificate verification"), "\(failed.output)")
        }
    }

    /// Where a leg's data begins, as `examine --json` says.
    private func dataStart(of leg: String) throws -> UInt64 {
        let json = try run([dmioNBDExecutable, "examine", "--json", leg])
        let object = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any]
        return try #require((object?["dataOffset"] as? NSNumber)?.uint64Value, "\(json)")
    }
}
