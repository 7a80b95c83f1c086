import Foundation
import LibNBD
import TestSupport
import Testing

/// `dmio-nbd serve`, as a person runs it.
@Suite struct CommandTests {
    private func folder() -> String {
        var template = Array("/tmp/dmio-cli-XXXXXX".utf8CString)
        return String(cString: mkdtemp(&template)!)
    }

    @Test func servesAFileUntilSIGTERMThenExitsCleanly() throws {
        let dir = folder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/nbd.sock"
        let serve = try ServeProcess(arguments: ["--socket", socket, "--create", "16M", "--export", "leg",
                                                 "--description", "a leg", dir + "/leg.img"], socket: socket)
        try serve.waitUntilListening()
        let nbd = try NBDHandle()
        try nbd.connect(uri: "nbd+unix:///leg?socket=\(socket)")
        #expect(try nbd.size() == 16 << 20)
        let data = pattern(65536, seed: 4)
        try nbd.write(data, at: 4096)
        #expect(serve.stop() == 0, "SIGTERM is a clean stop")
        #expect(!FileManager.default.fileExists(atPath: socket), "the socket is removed")
        let written = try Data(contentsOf: URL(fileURLWithPath: dir + "/leg.img"))
        #expect(Array(written[4096..<(4096 + 65536)]) == data)
    }

    @Test func aMissingLegIsAClearError() throws {
        let dir = folder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let serve = try ServeProcess(arguments: ["--socket", dir + "/s", dir + "/nope.img"], socket: dir + "/s")
        serve.process.waitUntilExit()
        #expect(serve.process.terminationStatus != 0)
        #expect(serve.stderr().contains("leg \(dir)/nope.img: No such file or directory"), "\(serve.stderr())")
    }

    @Test func aSocketInUseNamesTheServerUsingIt() throws {
        let dir = folder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/nbd.sock"
        let first = try ServeProcess(arguments: ["--socket", socket, "--create", "1M", dir + "/a.img"], socket: socket)
        try first.waitUntilListening()
        let second = try ServeProcess(arguments: ["--socket", socket, "--create", "1M", dir + "/b.img"], socket: socket)
        second.process.waitUntilExit()
        #expect(second.process.terminationStatus != 0)
        #expect(second.stderr().contains("socket \(socket) in use by pid \(first.process.processIdentifier)"),
                "\(second.stderr())")
        // A stale socket (its server killed) is taken over.
        #expect(first.stop(signal: SIGKILL) != 0)
        let third = try ServeProcess(arguments: ["--socket", socket, dir + "/a.img"], socket: socket)
        try third.waitUntilListening()
        #expect(try { let h = try NBDHandle(); try h.connect(unixSocket: socket); return try h.size() }() == 1 << 20)
    }

    /// A file served read-only: reads, and flushes (which clients send on
    /// close), succeed; writes get EPERM.
    @Test func aReadOnlyFileServesReadsAndFlushes() throws {
        let dir = folder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/nbd.sock"
        try run(["truncate", "-s", "1M", dir + "/ro.img"])
        let serve = try ServeProcess(arguments: ["--socket", socket, "--read-only", dir + "/ro.img"], socket: socket)
        try serve.waitUntilListening()
        let nbd = try NBDHandle()
        try nbd.connect(unixSocket: socket)
        #expect(try nbd.isReadOnly())
        #expect(try nbd.read(4096, at: 0) == [UInt8](repeating: 0, count: 4096))
        try nbd.flush()
        #expect(throws: NBDError.self) { try nbd.write(pattern(4096, seed: 2), at: 0) }
    }

    @Test func servesOverTCP() throws {
        let dir = folder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let port = 20000 + Int(getpid() % 20000)
        let serve = try ServeProcess(arguments: ["--tcp", "127.0.0.1:\(port)", "--create", "4M", dir + "/leg.img"],
                                     socket: "")
        var connected: NBDHandle?
        for _ in 0..<200 where connected == nil {
            // A handle whose connection failed cannot be used again.
            let nbd = try NBDHandle()
            if (try? nbd.connect(uri: "nbd://127.0.0.1:\(port)/")) != nil { connected = nbd } else { usleep(50_000) }
        }
        let nbd = try #require(connected)
        #expect(try nbd.size() == 4 << 20)
        #expect(serve.stop() == 0)
    }
}
