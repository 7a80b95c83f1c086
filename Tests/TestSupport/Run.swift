import Foundation

/// Runs a program found on PATH (in `directory` if given, for `timeout`
/// seconds at most); returns its standard output, or throws with its output
/// when it exits non-zero.
@discardableResult
public func run(_ arguments: [String], environment: [String: String] = [:], directory: String? = nil,
                timeout: Double? = nil) throws -> String {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = arguments
    process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
    if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
    let output = Pipe()
    let errors = Pipe()
    process.standardOutput = output
    process.standardError = errors
    try process.run()
    // A program that should have exited (a refusal) and serves instead is
    // stopped, so that the test fails rather than hangs.
    if let timeout {
        DispatchQueue.global().asyncAfter(deadline: .now() + timeout) { if process.isRunning { process.terminate() } }
    }
    let out = output.fileHandleForReading.readDataToEndOfFile()
    let err = errors.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else {
        throw CommandFailed(command: arguments.joined(separator: " "), status: process.terminationStatus,
                            output: String(decoding: err + out, as: UTF8.self))
    }
    return String(decoding: out, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
}

/// A program that exited non-zero, with what it said.
public struct CommandFailed: Error, CustomStringConvertible {
    public let command: String
    public let status: Int32
    public let output: String

    public init(command: String, status: Int32, output: String) {
        self.command = command
        self.status = status
        self.output = output
    }

    public var description: String { "\(command) exited \(status): \(output)" }
}

/// An executable the package builds, found beside the test bundle.
public func builtExecutable(_ name: String) -> String {
    let tests = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
    var folder = tests.deletingLastPathComponent()
    while !FileManager.default.fileExists(atPath: folder.appendingPathComponent(name).path), folder.path != "/" {
        folder.deleteLastPathComponent()
    }
    return folder.appendingPathComponent(name).path
}

/// A loop device over a file: a real block device, detached when released.
public final class LoopDevice {
    public let path: String

    public init(file: String, direct: Bool = false) throws {
        path = try run(["losetup", "--find", "--show", "--direct-io=\(direct ? "on" : "off")", file])
    }

    deinit { _ = try? run(["losetup", "--detach", path]) }
}

/// A stream socket connected to the unix socket at `path`.
public func connectedUnixSocket(_ path: String) throws -> Int32 {
    let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { sunPath in
        _ = path.utf8CString.withUnsafeBytes { sunPath.copyMemory(from: $0) }
    }
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
        }
    }
    guard connected == 0 else {
        let failure = errno
        close(descriptor)
        throw POSIXError(POSIXErrorCode(rawValue: failure) ?? .EIO)
    }
    return descriptor
}
