import ArgumentParser
import DMIO
import FoundationEssentials
import Glibc
import Logging
import Mirror

/// The mirror's control socket: a unix socket (mode 0600) on which each
/// connection sends one line (`status`, `fail-leg N`, `readd-leg N`,
/// `replace-leg N PATH`) and gets one JSON answer. Requests are served one
/// at a time, on a thread of their own: they are rare, and the leg changes
/// they make wait for metadata writes.
final class ControlServer: @unchecked Sendable {
    private let path: String
    private let listener: Int32
    private let mirror: Mirror
    private let logger: Logger
    private var thread: pthread_t?

    init(path: String, mirror: Mirror, logger: Logger) throws {
        self.path = path
        self.mirror = mirror
        self.logger = logger
        try claimSocketPath(path)
        listener = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        let bound = try withUnixAddress(path) { address, length in
            // Only the owner may change the mirror: the socket is made 0600.
            let mask = umask(0o177)
            defer { umask(mask) }
            return bind(listener, address, length)
        }
        guard bound == 0, Glibc.listen(listener, 8) == 0 else {
            let error = errno
            close(listener)
            throw CleanExit.message("cannot listen on control socket \(path): \(errnoDescription(error))", code: 1)
        }
        thread = startThread(named: "dmio-control") { [self] in serve() }
        logger.info("control socket \(path)")
    }

    func stop() {
        Glibc.shutdown(listener, Int32(SHUT_RDWR))
        if let thread { pthread_join(thread, nil) }
        close(listener)
        unlink(path)
    }

    private func serve() {
        while true {
            let connection = accept(listener, nil, nil)
            if connection < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                return
            }
            // A client that sends no line must not hold the socket (or a stop) for long.
            var timeout = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(connection, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            let request = readLine(connection)
            let answer = handle(request ?? "")
            writeAll(connection, answer + "\n")
            close(connection)
        }
    }

    private func handle(_ line: String) -> String {
        let words = line.split(separator: " ", maxSplits: 2).map(String.init)
        do {
            switch (words.first ?? "", words.count) {
            case ("status", 1):
                break
            case ("fail-leg", 2):
                try mirror.failLeg(try legIndex(words[1]))
            case ("readd-leg", 2):
                try mirror.readdLeg(try legIndex(words[1]))
            case ("replace-leg", 3):
                try mirror.replaceLeg(try legIndex(words[1]), with: words[2])
            case ("replace-leg-force", 3):
                try mirror.replaceLeg(try legIndex(words[1]), with: words[2], force: true)
            default:
                throw CleanExit.message("unknown request \"\(line)\"", code: 1)
            }
            if words.first != "status" { logger.info("control: \(line)") }
            return encode(ControlAnswer(ok: true, error: nil, status: mirror.status))
        } catch {
            logger.warning("control: \(line): \(error)")
            return encode(ControlAnswer(ok: false, error: "\(error)", status: mirror.status))
        }
    }

    private func legIndex(_ word: String) throws -> Int {
        guard let index = Int(word) else { throw CleanExit.message("\"\(word)\" is not a leg number", code: 1) }
        return index
    }

    private func encode(_ answer: ControlAnswer) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return (try? String(decoding: encoder.encode(answer), as: UTF8.self)) ?? #"{"ok":false}"#
    }
}

/// The JSON answer to a control request.
struct ControlAnswer: Codable {
    var ok: Bool
    var error: String?
    var status: MirrorStatus
}

/// What the control subcommands share: where the server is.
struct ControlOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The mirror's control socket (default: next to --socket).", valueName: "path"))
    var control: String?

    @Option(help: ArgumentHelp("The NBD socket the mirror is served on.", valueName: "path"))
    var socket: String?

    @Flag(help: "Print the answer as JSON.")
    var json = false

    /// Sends `request` and prints the answer; fails when the request did.
    func send(_ request: String) throws {
        let path = control ?? controlSocketPath(nextTo: socket ?? defaultSocketPath)
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        let connected = try withUnixAddress(path) { connect(fd, $0, $1) }
        guard connected == 0 else {
            throw CleanExit.message("cannot reach the mirror's control socket \(path): \(errnoDescription(errno)); "
                                    + "is `dmio-nbd serve` running? (--control or --socket tell where)", code: 1)
        }
        writeAll(fd, request + "\n")
        var reply: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = read(fd, &chunk, chunk.count)
            if count <= 0 { break }
            reply += chunk[0..<count]
        }
        guard let answer = try? JSONDecoder().decode(ControlAnswer.self, from: Data(reply)) else {
            throw CleanExit.message("the server's answer could not be read", code: 1)
        }
        if json {
            print(String(decoding: reply, as: UTF8.self), terminator: "")
        } else if answer.ok {
            print(describe(answer.status))
        }
        if !answer.ok { throw CleanExit.message(answer.error ?? "refused", code: 1) }
    }
}

/// The status for a person: the dmsetup line, then a table.
func describe(_ status: MirrorStatus) -> String {
    func mib(_ bytes: UInt64) -> String { "\(bytes >> 20) MiB" }
    var lines = [status.dmsetupLine, ""]
    lines.append("mirror \(status.uuid): \(mib(status.size)), \(status.regions) regions of \(status.regionBytes >> 10) KiB, "
                 + "\(status.dirtyRegions) dirty, event \(status.events)")
    let width = max(6, status.legs.map(\.device.count).max() ?? 0)
    lines.append("leg  state       " + "device".padding(width) + "  read/write errors  last error")
    for leg in status.legs {
        lines.append("\(leg.index)".padding(5) + leg.state.description.padding(12) + leg.device.padding(width)
                     + "  " + "\(leg.readErrors)/\(leg.writeErrors)".padding(19) + (leg.error ?? "-"))
    }
    let resync = status.resync
    if resync.active {
        lines.append("resync (\(resync.reason)): \(resync.summary)")
    } else if !resync.lastResult.isEmpty {
        lines.append("last resync: \(resync.lastResult)")
    }
    return lines.joined(separator: "\n")
}

extension String {
    fileprivate func padding(_ width: Int) -> String {
        self + String(repeating: " ", count: max(1, width - count))
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the mirror's legs, their health and the resync's progress.")
    @OptionGroup var options: ControlOptions
    func run() throws { try options.send("status") }
}

struct FailLeg: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fail-leg", abstract: "Take a leg out of the mirror (it is no longer read or written).")
    @Argument(help: "The leg's number (0 is the first).") var leg: Int
    @OptionGroup var options: ControlOptions
    func run() throws { try options.send("fail-leg \(leg)") }
}

struct ReaddLeg: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "readd-leg", abstract: "Bring a degraded leg back; only the regions written meanwhile are copied.")
    @Argument(help: "The leg's number (0 is the first).") var leg: Int
    @OptionGroup var options: ControlOptions
    func run() throws { try options.send("readd-leg \(leg)") }
}

struct ReplaceLeg: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "replace-leg", abstract: "Put a new device in place of a leg; it gets a full copy, online.")
    @Argument(help: "The leg's number (0 is the first).") var leg: Int
    @Argument(help: "The new leg: a file, a block device or an NBD URI, at least as large as the others.") var device: String
    @Flag(help: "Overwrite a device that holds a file system or a partition table.") var force = false
    @OptionGroup var options: ControlOptions
    func run() throws { try options.send("replace-leg\(force ? "-force" : "") \(leg) \(device)") }
}

struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make a new mirror of two or more legs.",
        discussion: """
            Makes a new, empty mirror: its metadata takes the first MiB of each leg (more on legs \
            over 4 TiB) and its data starts after it, so whatever the legs held is no longer \
            readable through the mirror. Legs that do not exist are made as sparse files of \
            --size. When every leg is new (all zeroes) the legs start in sync; otherwise, at \
            the first serve, leg 0's bytes are copied to the others so that the legs agree \
            (--assume-clean skips that copy when they already do).
            """)

    @Argument(help: "The legs: files, block devices or NBD URIs, all of one size.")
    var legs: [String]

    @Option(help: ArgumentHelp("Make missing legs as sparse files of this size (e.g. 1G).", valueName: "size"))
    var size: ByteSize?

    @Option(help: ArgumentHelp("Bytes of data per bit of the write-intent bitmap (default 512K).", valueName: "size"))
    var regionSize: ByteSize?

    @Flag(help: "Overwrite legs that already belong to a mirror, or hold a file system or a partition table.")
    var force = false

    @Flag(help: "The legs already hold the same data (all zeroes, or copies): skip the first copy.")
    var assumeClean = false

    func validate() throws {
        guard legs.count >= 2 else { throw ValidationError("a mirror needs at least 2 legs") }
        if let twice = duplicate(in: legs) { throw ValidationError("\(twice) is given twice") }
    }

    func run() throws {
        let client = try DMIOClient()
        let missing = legs.filter { !$0.contains("://") && access($0, F_OK) != 0 }
        if !missing.isEmpty && size == nil {
            throw CleanExit.message("\(missing.joined(separator: ", ")) do not exist; --size makes them", code: 1)
        }
        let devices = try legs.map { try openLeg($0, options: DeviceOptions(createSize: size?.bytes)) }
        let inSync = missing.count == legs.count || assumeClean
        do {
            let uuid = try Mirror.create(devices, client: client,
                                         regionBytes: regionSize.map { UInt32(clamping: $0.bytes) } ?? MirrorLayout.defaultRegionBytes,
                                         fresh: inSync, force: force, logger: makeLogger(verbose: false))
            let layout = try MirrorLayout(legBytes: devices[0].size)
            print("made mirror \(uuid): \(legs.count) legs, \(layout.dataBytes >> 20) MiB of data"
                  + (inSync ? ", in sync" : "; " + (legs.count == 2 ? "leg 1 gets" : "legs 1 to \(legs.count - 1) get")
                     + " a copy of leg 0 when served"))
        } catch {
            for path in missing { unlink(path) }
            throw CleanExit.message("\(error)", code: 1)
        }
    }
}

/// Calls `body` (connect or bind) with the unix socket address of `path`.
func withUnixAddress(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> Int32) throws -> Int32 {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let capacity = MemoryLayout.size(ofValue: address.sun_path)
    guard path.utf8.count < capacity else {
        throw CleanExit.message("socket path \(path) is longer than \(capacity - 1) bytes", code: 1)
    }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        path.utf8CString.withUnsafeBytes { raw.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0.prefix(raw.count))) }
    }
    return withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
}

private func readLine(_ fd: Int32) -> String? {
    var bytes: [UInt8] = []
    var byte: UInt8 = 0
    while bytes.count < 4096, read(fd, &byte, 1) == 1 {
        if byte == UInt8(ascii: "\n") { return String(decoding: bytes, as: UTF8.self) }
        bytes.append(byte)
    }
    return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self)
}

private func writeAll(_ fd: Int32, _ text: String) {
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if written < 0 && errno == EINTR { continue }
        if written <= 0 { return }
        bytes = bytes.dropFirst(written)
    }
}
