import DMIO
import Glibc

/// The inputs the server reads from outside, each a fuzz target (`make
/// fuzz`, one executable each under Fuzz/Targets) and replayed from its
/// corpus and its past crashes by `swift test` (FuzzReplayTests).
public enum FuzzInput: String, CaseIterable, Sendable {
    /// A client's bytes from the greeting on: options, STARTTLS, the handshake.
    case handshake
    /// A client's bytes after a handshake: requests, payloads, their validation.
    case requests
    /// A leg's superblock slot and bitmap.
    case metadata
    /// A request line on the control socket.
    case control

    /// Runs one input; returns only if the server took it without a crash.
    public func run(_ bytes: UnsafeRawBufferPointer) {
        switch self {
        case .handshake: ServerInput.handshake(bytes)
        case .requests: ServerInput.requests(bytes)
        case .metadata: MetadataInput.superblock(bytes)
        case .control: ControlInput.request(bytes)
        }
    }
}

extension FuzzInput {
    /// Runs each file of `paths` (a crash, a corpus entry), saying which.
    public func replay(_ paths: some Sequence<String>) throws {
        for path in paths {
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw ReplayError(path: path, errno: errno) }
            let bytes = readAll(fd)
            close(fd)
            print("\(rawValue): \(path) (\(bytes.count) bytes)")
            bytes.withUnsafeBytes(run)
        }
    }
}

/// A file to replay that could not be read.
public struct ReplayError: Error, CustomStringConvertible {
    let path: String
    let errno: Int32
    public var description: String { "\(path): \(errnoDescription(errno))" }
}

extension FuzzInput {
    /// Each file of the folder `path`, in name order: a corpus, or the crashes found.
    public static func files(in path: String) -> [String] {
        directoryEntries(path).filter { !$0.hasPrefix(".") }.sorted().map { path + "/" + $0 }
    }
}
