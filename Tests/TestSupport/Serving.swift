import Foundation
import Glibc
import LibNBD

/// The dmio-nbd executable built beside the tests.
public let dmioNBDExecutable = builtExecutable("dmio-nbd")

/// A `dmio-nbd serve` process, stopped with SIGTERM when released.
public final class ServeProcess {
    public let process = Process()
    public let socket: String
    private let errors = Pipe()
    private let output = Pipe()
    private let logged = Transcript()
    private let printed = Transcript()

    /// `dmio-nbd serve ARGUMENTS`, or with `subcommand` nil `dmio-nbd
    /// ARGUMENTS` (the default command), run in `directory` if given.
    /// `environment` adds to the test's own (an empty value unsets one, as
    /// far as dmio-nbd is concerned). `launcher` runs it, if given (a
    /// command that ends by running its arguments, as `unshare`).
    public init(arguments: [String], socket: String, subcommand: String? = "serve", directory: String? = nil,
                environment: [String: String] = [:], launcher: [String] = []) throws {
        self.socket = socket
        let command = launcher + [dmioNBDExecutable] + (subcommand.map { [$0] } ?? []) + arguments
        process.executableURL = URL(fileURLWithPath: command[0])
        process.arguments = Array(command.dropFirst())
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
        process.standardError = errors
        process.standardOutput = output
        try process.run()
    }

    /// Waits until the server answers on its socket (a stale socket file
    /// may be there before), over TLS with `tls`; throws with the server's
    /// words if it exits.
    public func waitUntilListening(tls: NBDTLSOptions? = nil) throws {
        let deadline = Date().addingTimeInterval(20)
        while !answers(socket, tls: tls) {
            guard process.isRunning else { throw CommandFailed(command: "dmio-nbd serve", status: process.terminationStatus, output: stderr()) }
            guard Date() < deadline else { throw CommandFailed(command: "dmio-nbd serve", status: -1, output: "no socket after 20 s") }
            usleep(20_000)
        }
    }

    /// Waits for the server to exit, `seconds` at most; whether it did.
    public func exits(within seconds: Double) -> Bool {
        poll(for: seconds) { !process.isRunning }
    }

    /// Waits for the server to log `text`, `seconds` at most; whether it did.
    public func logs(_ text: String, within seconds: Double) -> Bool {
        poll(for: seconds) { stderr().contains(text) }
    }

    /// Waits for the server to print `text` on its standard output,
    /// `seconds` at most; whether it did.
    public func prints(_ text: String, within seconds: Double) -> Bool {
        poll(for: seconds) { stdout().contains(text) }
    }

    private func poll(for seconds: Double, until done: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while !done() {
            guard Date() < deadline else { return false }
            usleep(10_000)
        }
        return true
    }

    public func stop(signal: Int32 = SIGTERM) -> Int32 {
        kill(process.processIdentifier, signal)
        // A server a test froze (SIGSTOP) takes the signal once it runs again.
        kill(process.processIdentifier, SIGCONT)
        process.waitUntilExit()
        return process.terminationStatus
    }

    /// Everything the server logged so far, without waiting for more.
    public func stderr() -> String { logged.read(from: errors) }

    /// Everything the server printed so far, without waiting for more.
    public func stdout() -> String { printed.read(from: output) }

    deinit {
        if process.isRunning { _ = stop() }
    }
}

/// What a process wrote to a pipe, kept: each read adds what is there
/// now, without waiting (a pipe's `availableData` waits for something,
/// and hands each byte out once).
private final class Transcript: @unchecked Sendable {
    private let lock = NSLock()
    private var bytes: [UInt8] = []

    func read(from pipe: Pipe) -> String {
        lock.withLock {
            let descriptor = pipe.fileHandleForReading.fileDescriptor
            var chunk = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                var ready = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
                guard poll(&ready, 1, 0) > 0 else { break }
                let count = Glibc.read(descriptor, &chunk, chunk.count)
                guard count > 0 else { break }
                bytes += chunk[..<count]
            }
            return String(decoding: bytes, as: UTF8.self)
        }
    }
}

/// Whether an NBD server answers on the unix socket at `path`, over TLS
/// with `tls`. (The socket file appears at bind, before the server listens,
/// and a dmio-nbd listens before its mirror is open.)
public func answers(_ path: String, tls: NBDTLSOptions? = nil) -> Bool {
    do {
        let handle = try NBDHandle()
        guard let tls else {
            try handle.connect(unixSocket: path)
            return true
        }
        try handle.setTLS(tls)
        try handle.connect(uri: "nbds+unix:///?socket=\(path)")
        return true
    } catch {
        return false
    }
}

/// Debian's python3 first on PATH: nbdsh and python libnbd need it.
public let toolEnvironment = ["PATH": "/usr/bin:/usr/sbin:/bin:/sbin:" + (ProcessInfo.processInfo.environment["PATH"] ?? "")]

/// Bytes with a pattern that differs by seed and position.
public func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 11 &+ Int(seed) &* 113) }
}

extension NBDHandle {
    public func write(_ bytes: [UInt8], at offset: UInt64, flags: NBDCommandFlags = []) throws {
        try bytes.withUnsafeBytes { try pwrite($0, offset: offset, flags: flags) }
    }

    public func read(_ count: Int, at offset: UInt64) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0xEE, count: count)
        try bytes.withUnsafeMutableBytes { try pread(into: $0, offset: offset) }
        return bytes
    }
}

/// An NBD server process on a unix socket (nbdkit, qemu-nbd), killed when
/// released.
public class NBDServerProcess {
    public let socket: String
    private let process = Process()
    private let ownFolder: String?

    /// Runs `command(socket)`, on `socket` if given (a restarted leg server
    /// keeps its address), else in a folder of its own, and waits until it
    /// answers.
    init(socket: String?, tls: NBDTLSOptions? = nil, command: (String) -> [String]) throws {
        if let socket {
            self.socket = socket
            ownFolder = nil
        } else {
            var template = Array("/tmp/nbd-server-XXXXXX".utf8CString)
            let folder = String(cString: mkdtemp(&template)!)
            self.socket = folder + "/nbd.sock"
            ownFolder = folder
        }
        let arguments = command(self.socket)
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        process.standardError = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(10)
        while !answers(self.socket, tls: tls) {
            guard process.isRunning, Date() < deadline else {
                throw CommandFailed(command: arguments.joined(separator: " "), status: -1, output: "did not start")
            }
            usleep(10_000)
        }
    }

    public var uri: String { "nbd+unix:///?socket=\(socket)" }

    /// Freezes the server (SIGSTOP): its socket stays open and nothing on it
    /// answers, as on a machine that hangs. Returns once every thread of it
    /// has stopped (a signal is delivered after kill returns). It thaws by
    /// itself after `limit` seconds, so that a test of a timeout that does
    /// not fire fails instead of hanging.
    public func freeze(limit: Double = 20) {
        let pid = process.processIdentifier
        Glibc.kill(pid, SIGSTOP)
        DispatchQueue.global().asyncAfter(deadline: .now() + limit) { [process] in
            if process.isRunning { Glibc.kill(pid, SIGCONT) }
        }
        waitUntilStopped()
    }

    /// Thaws a frozen server before its limit.
    public func thaw() {
        Glibc.kill(process.processIdentifier, SIGCONT)
    }

    private func waitUntilStopped() {
        let tasks = "/proc/\(process.processIdentifier)/task"
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline {
            let threads = (try? FileManager.default.contentsOfDirectory(atPath: tasks)) ?? []
            let stopped = threads.allSatisfy { thread in
                let stat = (try? String(contentsOfFile: "\(tasks)/\(thread)/stat", encoding: .utf8)) ?? ""
                // The state follows the command name, which is in brackets.
                return stat.split(separator: ")").last?.trimmingCharacters(in: .whitespaces).hasPrefix("T") ?? false
            }
            if stopped { return }
            usleep(1_000)
        }
    }

    /// Kills the server, as a crash or a lost machine would.
    public func kill() {
        Glibc.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        unlink(socket)
    }

    deinit {
        if process.isRunning { kill() }
        if let ownFolder { try? FileManager.default.removeItem(atPath: ownFolder) }
    }
}

/// An nbdkit server: `arguments` follow nbdkit's own options (filters, the
/// plugin, its parameters).
public final class NBDKit: NBDServerProcess {
    /// With `tls`, the client settings that reach it (for its --tls=require).
    public init(_ arguments: [String], socket: String? = nil, tls: NBDTLSOptions? = nil) throws {
        try super.init(socket: socket, tls: tls) { ["nbdkit", "--foreground", "--exit-with-parent", "--unix", $0] + arguments }
    }
}

/// qemu-nbd serving a raw file to any number of clients, with its defaults
/// (trim requests are ignored: `--discard=ignore`) unless `arguments` say
/// otherwise.
public final class QemuNBD: NBDServerProcess {
    public init(file: String, arguments: [String] = [], socket: String? = nil) throws {
        try super.init(socket: socket) { ["qemu-nbd", "--persistent", "--format=raw", "--socket=\($0)"] + arguments + [file] }
    }
}
