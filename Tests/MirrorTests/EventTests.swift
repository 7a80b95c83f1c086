import Foundation
import LibNBD
import TestSupport
import Testing

/// `dmio-nbd events` and `serve --on-event`: what a watcher reads and what
/// the hook program is called with, as a leg fails for real (nbdkit's error
/// filter) and comes back; and that neither a hung hook nor watchers that
/// never read hold the mirror.
@Suite(.serialized) struct EventTests {
    /// `dmio-nbd events ARGUMENTS` (or another command), its lines read as they come.
    final class Watcher {
        let process = Process()
        private let output = Pipe()
        private let lock = NSLock()
        private var text = ""

        init(_ arguments: [String], command: String = "events") throws {
            process.executableURL = URL(fileURLWithPath: dmioNBDExecutable)
            process.arguments = [command] + arguments
            process.standardOutput = output
            process.standardError = FileHandle.nullDevice
            output.fileHandleForReading.readabilityHandler = { [weak self] handle in
                let data = handle.availableData
                guard let self else { return }
                self.lock.withLock { self.text += String(decoding: data, as: UTF8.self) }
            }
            try process.run()
        }

        var lines: [String] { lock.withLock { text.split(separator: "\n").map(String.init) } }

        /// Waits (`timeout` seconds at most) for a line after line `after`
        /// that contains every one of `parts`; returns its index.
        @discardableResult
        func waitFor(_ parts: String..., after: Int = -1, timeout: Double = 1) -> Int? {
            let deadline = Date().addingTimeInterval(timeout)
            repeat {
                let found = lines.enumerated().first { index, line in index > after && parts.allSatisfy { line.contains($0) } }
                if let found { return found.offset }
                usleep(10_000)
            } while Date() < deadline
            Issue.record("no event line with \(parts) within \(timeout) s; got:\n\(lines.joined(separator: "\n"))")
            return nil
        }

        deinit {
            if process.isRunning { process.terminate() }
        }
    }

    @Test func aWatcherSeesTheStateThenALegFailingAndComingBack() throws {
        let fixture = MirrorFixture()
        let legs = try FailingLegMirror(fixture, errno: "ENOSPC")
        let server = try fixture.serve(legs.legs)
        let uuid = try fixture.status().uuid
        let watcher = try Watcher(["--now", "--socket", fixture.socket])
        watcher.waitFor("exists mirror", "mirror:\(uuid)")
        watcher.waitFor("exists leg", "leg:1", "state:in_sync")
        let end = watcher.waitFor("exists -")
        let handle = try fixture.connect()
        watcher.waitFor("connection opened", "mirror:\(uuid)")

        legs.failWrites()
        _ = try handle.writeRegions(0..<2, seed: 1)
        try writeApart(handle)
        let failed = watcher.waitFor("change leg", "mirror:\(uuid)", "leg:1", "state:in_sync->degraded", "cause:write",
                                     "errno:ENOSPC")
        #expect((failed ?? 0) > (end ?? .max), "the change comes after the state")
        watcher.waitFor("metadata written", "mirror:\(uuid)")

        try legs.healWrites()
        try fixture.control(["readd-leg", "1"])
        let rebuilding = watcher.waitFor("change leg", "leg:1", "state:degraded->rebuilding", timeout: 5)
        let started = watcher.waitFor("resync started", timeout: 5)
        let progress = watcher.waitFor("resync progress", "percent:50", timeout: 10)
        let finished = watcher.waitFor("resync finished", "result:done", timeout: 10)
        let back = watcher.waitFor("change leg", "leg:1", "state:rebuilding->in_sync", timeout: 10)
        if let rebuilding, let started, let progress, let finished, let back {
            #expect(rebuilding < started && started < progress && progress < finished && finished < back,
                    "\(watcher.lines)")
        }
        handle.shutdown()
        watcher.waitFor("connection closed")

        // JSON lines, one object each.
        let json = try Watcher(["--now", "--json", "--socket", fixture.socket])
        if let index = json.waitFor("\"object\":\"leg\"", "\"leg\":\"1\"") {
            let object = try JSONSerialization.jsonObject(with: Data(json.lines[index].utf8)) as? [String: String]
            #expect(object?["verb"] == "exists" && object?["state"] == "in_sync" && object?["mirror"] == uuid)
        }
        #expect(server.stop() == 0)
        watcher.process.waitUntilExit()
        #expect(watcher.process.terminationStatus == 0, "a watcher ends when the server stops")
    }

    /// Writes ten regions with a clean one between each two: a resync of
    /// them copies ten runs, and says how far it is after each.
    private func writeApart(_ handle: NBDHandle) throws {
        for region in stride(from: 4, to: 24, by: 2) { _ = try handle.writeRegions(region..<(region + 1), seed: 9) }
    }

    /// A hook that writes its arguments and its DMIO_ variables, one call a line.
    private func recordingHook(_ fixture: MirrorFixture) throws -> (program: String, calls: String) {
        let program = fixture.path("hook.sh")
        let calls = fixture.path("calls.txt")
        try """
            #!/bin/sh
            echo "$* leg=${DMIO_LEG:-} device=${DMIO_LEG_DEVICE:-} errno=${DMIO_ERRNO:-} mirror=${DMIO_MIRROR} line=${DMIO_STATE_LINE}" >> \(calls)
            """.write(toFile: program, atomically: true, encoding: .utf8)
        chmod(program, 0o755)
        return (program, calls)
    }

    private func calls(_ path: String, count: Int, timeout: Double = 5) -> [String] {
        let deadline = Date().addingTimeInterval(timeout)
        var lines: [String] = []
        repeat {
            lines = ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
            if lines.count >= count { return lines }
            usleep(20_000)
        } while Date() < deadline
        Issue.record("the hook was called \(lines.count) times, not \(count): \(lines)")
        return lines
    }

    @Test func theHookIsCalledAsMdadmCallsItsProgram() throws {
        let fixture = MirrorFixture()
        let legs = try FailingLegMirror(fixture, errno: "ENOSPC")
        let hook = try recordingHook(fixture)
        let server = try fixture.serve(legs.legs + ["--on-event", hook.program, "--test-event"])
        let uuid = try fixture.status().uuid
        #expect(calls(hook.calls, count: 1).first?.hasPrefix("TestMessage \(uuid) ") == true)

        let handle = try fixture.connect()
        legs.failWrites()
        _ = try handle.writeRegions(0..<2, seed: 2)
        // As mdadm: a failure is Fail alone (DegradedArray is for a mirror found degraded at the start).
        var lines = calls(hook.calls, count: 2, timeout: 1)
        #expect(lines.count > 1 && lines[1].hasPrefix("Fail \(uuid) \(legs.remote.uri) leg=1 device=\(legs.remote.uri) errno=ENOSPC"),
                "\(lines)")
        #expect(lines.count > 1 && lines[1].contains("line=change leg mirror:\(uuid) leg:1"), "\(lines)")

        // Twelve regions out of sync, in eleven runs: the resync says how far it is after each.
        try writeApart(handle)
        try legs.healWrites()
        try fixture.control(["readd-leg", "1"])
        lines = calls(hook.calls, count: 9)
        let events = lines.map { String($0.prefix { $0 != " " }) }
        #expect(events == ["TestMessage", "Fail", "RebuildStarted", "Rebuild20", "Rebuild40", "Rebuild60", "Rebuild80",
                           "RebuildFinished", "SpareActive"], "\(lines)")
        // The resync told 25 % after its third run of twelve regions: the first multiple of 20 passed.
        #expect(lines.count == 9 && lines[3].contains("line=resync progress mirror:\(uuid) percent:25"), "\(lines)")
        handle.shutdown()
        #expect(server.stop() == 0)
    }

    @Test func aMirrorThatStartsWithALegOutIsADegradedArray() throws {
        let fixture = MirrorFixture()
        let legs = [fixture.path("leg0.img"), fixture.path("leg1.img")]
        var server = try fixture.serve(legs + ["--create", "64M"])
        try fixture.control(["fail-leg", "1"])
        #expect(server.stop() == 0)
        let hook = try recordingHook(fixture)
        server = try fixture.serve(legs + ["--on-event", hook.program, "--on-event-increment", "25"])
        let uuid = try fixture.status().uuid
        let lines = calls(hook.calls, count: 1, timeout: 1)
        #expect(lines.first?.hasPrefix("DegradedArray \(uuid) ") == true, "\(lines)")
        #expect(server.stop() == 0)
        #expect(calls(hook.calls, count: 1).count == 1, "one call, at the start")
    }

    @Test func aHookThatHangsNeverSlowsWritesAndIsKilled() throws {
        let fixture = MirrorFixture()
        let program = fixture.path("hang.sh")
        let started = fixture.path("started")
        // Its sleep carries a name of this test's own, for pgrep.
        let marker = "dmio-hook-test-\(getpid())"
        try "#!/bin/bash\ntouch \(started)\nexec -a \(marker) sleep 1000\n".write(toFile: program, atomically: true, encoding: .utf8)
        chmod(program, 0o755)
        let server = try fixture.serve([fixture.path("leg0.img"), fixture.path("leg1.img"), "--create", "64M",
                                        "--on-event", program, "--on-event-timeout", "2"])
        let handle = try fixture.connect()
        try fixture.control(["fail-leg", "1"])
        let deadline = Date().addingTimeInterval(5)
        while !FileManager.default.fileExists(atPath: started) && Date() < deadline { usleep(20_000) }
        #expect(FileManager.default.fileExists(atPath: started), "the hook ran")
        usleep(100_000)
        #expect((try? run(["pgrep", "-f", marker])) != nil, "the hook sleeps")
        // The hook sleeps; writes go on as fast as ever.
        let before = Date()
        let written = try handle.writeRegions(0..<32, seed: 3)
        #expect(Date().timeIntervalSince(before) < 1.5, "32 writes while the hook hangs")
        try handle.expectReadBack(written)
        // The call (Fail) is killed after its 2 s, with its process group.
        usleep(5_000_000)
        #expect((try? run(["pgrep", "-f", marker])) == nil, "the hook's sleep is gone")
        #expect(server.stop() == 0)
    }

    @Test func watchersThatNeverReadAreDroppedAndCostABoundedAmount() throws {
        let fixture = MirrorFixture()
        let server = try fixture.serve([fixture.path("leg0.img"), fixture.path("leg1.img"), "--create", "64M"])
        let controlSocket = controlPath(try fixture.status().uuid)
        var silent: [Int32] = []
        for _ in 0..<20 {
            let fd = try connectedUnixSocket(controlSocket)
            _ = "{\"command\":\"events\",\"now\":true}\n".withCString { send(fd, $0, strlen($0), 0) }
            silent.append(fd)
        }
        defer { for fd in silent { close(fd) } }
        usleep(200_000)
        let rssBefore = residentKiB(server.process.processIdentifier)
        // Each connection is two events: more than a watcher's queue and its socket hold.
        for _ in 0..<800 {
            let handle = try NBDHandle()
            try handle.connect(unixSocket: fixture.socket)
            handle.shutdown()
        }
        let grown = residentKiB(server.process.processIdentifier) - rssBefore
        #expect(grown < 64 << 10, "the server grew by \(grown) KiB for 20 silent watchers")
        // A watcher that reads now gets what the queue held, then the last line: dropped.
        var text = ""
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        var timeout = timeval(tv_sec: 15, tv_usec: 0)
        setsockopt(silent[0], SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        while true {
            let count = recv(silent[0], &buffer, buffer.count, 0)
            if count <= 0 { break }
            text += String(decoding: buffer[..<count], as: UTF8.self)
        }
        #expect(text.contains("\"verb\":\"dropped\""), "the last line says the watcher was dropped")
        // The mirror never waited: it still answers.
        let handle = try fixture.connect()
        _ = try handle.writeRegions(0..<4, seed: 4)
        handle.shutdown()
        #expect(server.stop() == 0)
    }

    @Test func watchersAreCappedAndThoseThatLeaveFreeTheirPlaces() throws {
        let fixture = MirrorFixture()
        let server = try fixture.serve([fixture.path("leg0.img"), fixture.path("leg1.img"), "--create", "64M"])
        let controlSocket = controlPath(try fixture.status().uuid)
        let pid = server.process.processIdentifier
        let threadsBefore = threadCount(pid)
        func watch() throws -> Int32 {
            let fd = try connectedUnixSocket(controlSocket)
            _ = "{\"command\":\"events\",\"now\":true}\n".withCString { send(fd, $0, strlen($0), 0) }
            return fd
        }
        var watchers = try (0..<64).map { _ in try watch() }
        // Each got its state: the server made its thread.
        for fd in watchers {
            var timeout = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            var byte: UInt8 = 0
            #expect(recv(fd, &byte, 1, 0) == 1)
        }
        let extra = try Watcher(["--socket", fixture.socket])
        extra.waitFor("refused -", "reason:64\\x20watchers\\x20listen\\x20already")
        extra.process.waitUntilExit()
        #expect(extra.process.terminationStatus == 1, "a refused watcher fails")
        #expect(threadCount(pid) >= threadsBefore + 64)

        // The clients go, on a mirror where nothing happens: their threads go too.
        for fd in watchers { close(fd) }
        watchers = []
        let deadline = Date().addingTimeInterval(5)
        while threadCount(pid) > threadsBefore && Date() < deadline { usleep(50_000) }
        #expect(threadCount(pid) <= threadsBefore, "threads left behind: \(threadCount(pid) - threadsBefore)")
        let again = try Watcher(["--now", "--socket", fixture.socket])
        again.waitFor("exists -", timeout: 10)
        #expect(server.stop() == 0)
    }

    @Test func statusWatchPrintsALineEachTimeTheMirrorChanges() throws {
        let fixture = MirrorFixture()
        let server = try fixture.serve([fixture.path("leg0.img"), fixture.path("leg1.img"), "--create", "64M"])
        let watch = try Watcher(["--watch", "--socket", fixture.socket], command: "status")
        let first = watch.waitFor("2 of 2 legs in sync", timeout: 5)
        try fixture.control(["fail-leg", "1"])
        // Seconds, not one: under a full suite on two cores, the watch's
        // next line once took longer than a second.
        let failed = watch.waitFor("1 of 2 legs in sync", after: first ?? 0, timeout: 5)
        try fixture.control(["readd-leg", "1"])
        watch.waitFor("2 of 2 legs in sync", after: failed ?? 0, timeout: 10)
        #expect(server.stop() == 0)
    }

    private func controlPath(_ uuid: String) -> String {
        let folder = ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"].map { $0 + "/dmio-nbd" } ?? "/run/dmio-nbd"
        return "\(folder)/\(uuid).ctl"
    }

    private func threadCount(_ pid: Int32) -> Int {
        let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("Threads:") } ?? ""
        return Int(line.split(separator: "\t").last ?? "") ?? 0
    }

    private func residentKiB(_ pid: Int32) -> Int {
        let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
    }
}
