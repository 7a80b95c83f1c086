import Foundation
import LibNBD
import TestSupport
import Testing

/// The dmio-nbd executable built beside the tests.
let dmioNBDExecutable = builtExecutable("dmio-nbd")

/// A `dmio-nbd serve` process, stopped with SIGTERM when released.
final class ServeProcess {
    let process = Process()
    let socket: String
    private let errors = Pipe()

    init(arguments: [String], socket: String) throws {
        self.socket = socket
        process.executableURL = URL(fileURLWithPath: dmioNBDExecutable)
        process.arguments = ["serve"] + arguments
        process.standardError = errors
        process.standardOutput = FileHandle.nullDevice
        try process.run()
    }

    /// Waits until the server answers on its socket (a stale socket file
    /// may be there before); throws with the server's words if it exits.
    func waitUntilListening() throws {
        let deadline = Date().addingTimeInterval(20)
        while (try? NBDHandle().connect(unixSocket: socket)) == nil {
            guard process.isRunning else { throw CommandFailed(command: "dmio-nbd serve", status: process.terminationStatus, output: stderr()) }
            guard Date() < deadline else { throw CommandFailed(command: "dmio-nbd serve", status: -1, output: "no socket after 20 s") }
            usleep(20_000)
        }
    }

    func stop(signal: Int32 = SIGTERM) -> Int32 {
        kill(process.processIdentifier, signal)
        process.waitUntilExit()
        return process.terminationStatus
    }

    func stderr() -> String {
        String(decoding: errors.fileHandleForReading.availableData, as: UTF8.self)
    }

    deinit {
        if process.isRunning { _ = stop() }
    }
}

/// Debian's python3 first on PATH: nbdsh and python libnbd need it.
let toolEnvironment = ["PATH": "/usr/bin:/usr/sbin:/bin:/sbin:" + (ProcessInfo.processInfo.environment["PATH"] ?? "")]
