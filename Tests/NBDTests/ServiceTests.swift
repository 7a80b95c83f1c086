import Foundation
import Glibc
import LibNBD
import TestSupport
import Testing

/// dmio-nbd as a service: started by socket activation (libnbd's tools,
/// systemd-socket-activate), readiness by --pidfile and sd_notify, and the
/// unit files in contrib/systemd.
@Suite struct ServiceTests {
    private let dir: String
    private var legs: [String] { [dir + "/leg0.img", dir + "/leg1.img"] }

    init() throws {
        var template = Array("/tmp/dmio-service-XXXXXX".utf8CString)
        dir = String(cString: mkdtemp(&template)!)
    }

    private func makeMirror() throws {
        try run([dmioNBDExecutable, "create", "--size", "16M"] + legs)
    }

    /// `nbdcopy -- [ dmio-nbd serve LEG LEG ]`: libnbd starts the server on
    /// a socket it hands over (LISTEN_FDS), and stops it when done.
    @Test func libnbdToolsStartTheMirrorThemselves() throws {
        try makeMirror()
        let command = ["[", dmioNBDExecutable, "serve"] + legs + ["]"]
        let size = try #require(UInt64(try run(["nbdinfo", "--size", "--"] + command, environment: toolEnvironment)))
        #expect(size > 8 << 20 && size < 16 << 20, "the legs less their metadata")
        let data = dir + "/data.img"
        try Data(pattern(Int(size), seed: 21)).write(to: URL(fileURLWithPath: data))
        try run(["nbdcopy", data, "--"] + command, environment: toolEnvironment)
        try run(["nbdcopy", "--"] + command + [dir + "/back.img"], environment: toolEnvironment)
        #expect(try Data(contentsOf: URL(fileURLWithPath: dir + "/back.img"))
                == (try Data(contentsOf: URL(fileURLWithPath: data))))
    }

    /// systemd's own tool listens, starts dmio-nbd at the first connection
    /// and hands it the socket; the pidfile appears once it serves, and goes
    /// at the stop, which leaves the service manager's socket file alone.
    @Test func systemdSocketActivateHandsItsSocketOver() throws {
        let socket = dir + "/activated.sock"
        let pidfile = dir + "/dmio-nbd.pid"
        let activator = Process()
        activator.executableURL = URL(fileURLWithPath: "/usr/bin/systemd-socket-activate")
        activator.arguments = ["-l", socket, dmioNBDExecutable, "serve", "--pidfile", pidfile, "--create", "8M", dir + "/one.img"]
        activator.standardError = FileHandle.nullDevice
        try activator.run()
        defer { if activator.isRunning { kill(activator.processIdentifier, SIGKILL) } }
        var handle: NBDHandle?
        for _ in 0..<200 where handle == nil {
            let attempt = try NBDHandle()
            if (try? attempt.connect(unixSocket: socket)) != nil { handle = attempt } else { usleep(50_000) }
        }
        let nbd = try #require(handle)
        try nbd.write(pattern(65536, seed: 8), at: 0)
        #expect(try nbd.read(65536, at: 0) == pattern(65536, seed: 8))
        let pid = try String(contentsOfFile: pidfile, encoding: .utf8)
        // systemd-socket-activate execs the server: the pid is the one it started.
        #expect(pid == "\(activator.processIdentifier)\n")
        nbd.shutdown()
        kill(activator.processIdentifier, SIGTERM)
        activator.waitUntilExit()
        #expect(activator.terminationStatus == 0)
        #expect(!FileManager.default.fileExists(atPath: pidfile), "the pidfile is removed at the stop")
        #expect(FileManager.default.fileExists(atPath: socket), "the socket file is the service manager's")
    }

    /// NOTIFY_SOCKET: READY=1 with the mirror's state once it serves,
    /// STOPPING=1 at the stop.
    @Test func theServiceManagerIsToldWhenTheMirrorIsReadyAndWhenItStops() throws {
        try makeMirror()
        let notify = dir + "/notify"
        let listener = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        defer { close(listener) }
        _ = try bindUnix(listener, notify)
        var timeout = timeval(tv_sec: 20, tv_usec: 0)
        setsockopt(listener, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let socketPath = dir + "/nbd.sock"
        let server = try ServeProcess(arguments: ["--socket", socketPath] + legs, socket: socketPath,
                                      environment: ["NOTIFY_SOCKET": notify])
        let ready = receive(listener)
        #expect(ready.contains("READY=1"), "\(ready)")
        #expect(ready.contains("STATUS=mirror "), "\(ready)")
        #expect(ready.contains("2 of 2 legs in sync"), "\(ready)")
        #expect(answers(socketPath), "READY=1 comes once the mirror is served")
        #expect(server.stop() == 0)
        #expect(receive(listener).contains("STOPPING=1"))
    }

    /// Under systemd, standard error is the journal (JOURNAL_STREAM names
    /// it): lines carry their syslog priority and no timestamp of their own.
    @Test func theLogToTheJournalCarriesPrioritiesAndNoTimestamps() throws {
        try makeMirror()
        let log = dir + "/journal.txt"
        let socketPath = dir + "/nbd.sock"
        try run(["bash", "-c", """
            exec 2>'\(log)'
            export JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2)
            '\(dmioNBDExecutable)' serve --socket '\(socketPath)' --tcp 127.0.0.1:0 '\(legs[0])' '\(legs[1])' &
            for i in $(seq 200); do [ -S '\(socketPath)' ] && break; sleep 0.05; done
            sleep 0.5; kill $!; wait $!
            """])
        let lines = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").map(String.init)
        #expect(!lines.isEmpty)
        #expect(lines.allSatisfy { $0.range(of: #"^<[2-7]>"#, options: .regularExpression) != nil }, "\(lines)")
        #expect(lines.allSatisfy { $0.range(of: #"\d{4}-\d\d-\d\dT\d\d:"#, options: .regularExpression) == nil },
                "no timestamp of its own: \(lines)")
        #expect(lines.contains { $0.hasPrefix("<4>") && $0.contains("without --tls=require") }, "the warning is priority 4: \(lines)")
        #expect(lines.contains { $0.hasPrefix("<6>") && $0.contains("serving") }, "\(lines)")
    }

    private func receive(_ fd: Int32) -> String {
        var bytes = [UInt8](repeating: 0, count: 4096)
        let count = recv(fd, &bytes, bytes.count, 0)
        return count > 0 ? String(decoding: bytes[..<count], as: UTF8.self) : ""
    }

    private func bindUnix(_ fd: Int32, _ path: String) throws -> Int32 {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            path.utf8CString.withUnsafeBytes { raw.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0.prefix(raw.count))) }
        }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }

    /// The units pass `systemd-analyze verify` without a word (an unknown
    /// key is only a warning there), as an instance, with the binary built.
    /// So does the monthly check's timer in examples/.
    @Test func theSystemdUnitsVerify() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let units = ["contrib/systemd/dmio-nbd@.service", "contrib/systemd/dmio-nbd@.socket",
                     "examples/systemd/dmio-nbd-check@.service", "examples/systemd/dmio-nbd-check@.timer"]
        var instances: [String] = []
        for unit in units {
            let text = try String(contentsOfFile: root.appendingPathComponent(unit).path, encoding: .utf8)
                .replacingOccurrences(of: "/usr/local/bin/dmio-nbd", with: dmioNBDExecutable)
            let instance = "\(dir)/" + URL(fileURLWithPath: unit).lastPathComponent.replacingOccurrences(of: "@.", with: "@mirror0.")
            try text.write(toFile: instance, atomically: true, encoding: .utf8)
            instances.append("'\(instance)'")
        }
        let checked = try run(["bash", "-c", "systemd-analyze verify \(instances.joined(separator: " ")) 2>&1"])
        #expect(checked.isEmpty, "\(checked)")
    }

    /// The service manager chose the sockets: --socket as well is refused.
    @Test func socketActivationRefusesSocketFlags() throws {
        let socket = dir + "/activated.sock"
        let activator = Process()
        activator.executableURL = URL(fileURLWithPath: "/usr/bin/systemd-socket-activate")
        activator.arguments = ["-l", socket, dmioNBDExecutable, "serve", "--socket", dir + "/own.sock",
                               "--create", "8M", dir + "/one.img"]
        let errors = Pipe()
        activator.standardError = errors
        try activator.run()
        for _ in 0..<100 where !FileManager.default.fileExists(atPath: socket) { usleep(20_000) }
        _ = try? NBDHandle().connect(unixSocket: socket)
        activator.waitUntilExit()
        #expect(activator.terminationStatus != 0)
        let said = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(said.contains("--socket and --tcp cannot be given with socket activation"), "\(said)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/one.img"), "nothing was made")
    }
}
