import ArgumentParser
import BlockTargets
import ControlProtocol
import DMIO
import FoundationEssentials
import Glibc
import Mirror

/// What the control subcommands share: which mirror they talk to. With
/// none of --control, --mirror and --socket, every mirror served on this
/// machine (its control socket in `ControlFolder`): `status` shows them
/// all, the leg commands need there to be one.
struct ControlOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The mirror's control socket.", valueName: "path"))
    var control: String?

    @Option(help: ArgumentHelp("The mirror's UUID (or its first characters).", valueName: "uuid"))
    var mirror: String?

    @Option(help: ArgumentHelp("The mirror served on this NBD socket.", valueName: "path"))
    var socket: String?

    @Flag(help: "Print the answer as JSON (its fields are in the README).")
    var json = false

    /// The mirrors named, each with its control socket.
    func reports() throws -> [(control: String, report: MirrorReport)] {
        let controls = control.map { [$0] } ?? ControlFolder.sockets
        var found: [(control: String, report: MirrorReport)] = []
        var forbidden = false
        for path in controls {
            do {
                found.append((path, try exchange(ControlRequest(command: .status), with: path).report))
            } catch {
                // With --control the one socket named must answer; in the
                // folder, a socket no server answers is a crashed server's,
                // and one this user may not open is another user's.
                if control != nil { throw error }
                if (error as? ControlUnreachable)?.errno == EACCES { forbidden = true }
            }
        }
        let matching = found.filter { _, report in
            (mirror.map { report.mirror.uuid.hasPrefix($0.lowercased()) } ?? true)
                && (socket.map { report.served.contains("unix:\(absolutePath($0))") } ?? true)
        }
        guard !matching.isEmpty else {
            if forbidden {
                throw CleanExit.message("the control sockets in \(ControlFolder.path) are another user's: "
                                        + "run this as the user who serves the mirror", code: 1)
            }
            let which = [mirror.map { "mirror \($0)" }, socket.map { "on socket \($0)" }].compactMap { $0 }
            throw CleanExit.message(
                "no mirror \(which.isEmpty ? "is served here" : which.joined(separator: " ") + " is served here") "
                + "(no control socket in \(ControlFolder.path) answers\(found.isEmpty ? "" : " for it")); "
                + "is `dmio-nbd serve` running? --control PATH names its socket", code: 1)
        }
        return matching
    }

    /// The control socket of the one mirror named.
    func oneControl() throws -> String {
        let named = try reports()
        guard named.count == 1 else {
            throw CleanExit.message("\(named.count) mirrors are served here: name one with --mirror UUID ("
                                    + named.map { "\($0.report.mirror.uuid) on \($0.report.served.joined(separator: ", "))" }
                                        .joined(separator: "; ") + ")", code: 1)
        }
        return named[0].control
    }

    /// Sends `request` to the one mirror named and prints the mirror as it
    /// is after it; fails when the request did.
    func send(_ request: ControlRequest) throws {
        print([try ask(request, of: try oneControl())])
    }

    /// Sends `request` to the control socket at `path`; the mirror as it is
    /// after it, or the refusal as the error.
    func ask(_ request: ControlRequest, of path: String) throws -> MirrorReport {
        let answer = try exchange(request, with: path)
        guard answer.ok else { throw CleanExit.message(answer.error ?? "refused", code: 1) }
        return answer.report
    }

    /// Prints mirrors' reports: as JSON, or for a person.
    func print(_ reports: [MirrorReport]) {
        if json {
            Swift.print(encodeJSON(StatusOutput(mirrors: reports)))
        } else {
            Swift.print(reports.map { describe($0) }.joined(separator: "\n\n"))
        }
    }

    /// A connection to the control socket at `path` that has sent `request`.
    func connect(_ path: String, sending request: ControlRequest) throws -> Int32 {
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        let connected = try withUnixAddress(path) { Glibc.connect(fd, $0, $1) }
        guard connected == 0 else {
            let error = errno
            close(fd)
            throw ControlUnreachable(path: path, errno: error)
        }
        sendAll(fd, encodeJSON(request) + "\n")
        return fd
    }

    private func exchange(_ request: ControlRequest, with path: String) throws -> ControlAnswer {
        let fd = try connect(path, sending: request)
        defer { close(fd) }
        guard let answer = try? JSONDecoder().decode(ControlAnswer.self, from: Data(readAll(fd))) else {
            throw CleanExit.message("the answer on \(path) could not be read (is the server another version of dmio-nbd?)",
                                    code: 1)
        }
        return answer
    }
}

/// A mirror for a person: the dmsetup line, then a table; `coloured` for a
/// terminal (leg states in colour, a resync's progress bar).
func describe(_ report: MirrorReport, coloured: Bool = false) -> String {
    let status = report.mirror
    func mib(_ bytes: UInt64) -> String { "\(bytes >> 20) MiB" }
    var lines = [status.dmsetupLine, ""]
    lines.append("mirror \(status.uuid): \(mib(status.size)), \(status.regions) regions of \(status.regionBytes >> 10) KiB, "
                 + "\(status.dirtyRegions) dirty, event \(status.events)")
    lines.append("served on \(report.served.joined(separator: ", "))"
                 + (status.readPolicy.map { "; reads: \($0)" } ?? ""))
    // One column wider than the longest name: `padded` adds a space at least.
    let width = max(6, status.legs.map(\.device.count).max() ?? 0) + 1
    lines.append("leg  state       " + "device".padded(width) + "  read/write errors  why out, or last error")
    for leg in status.legs {
        let state = (leg.condition == .behind ? "behind" : leg.state.description).padded(12)
        lines.append("\(leg.index)".padded(5) + (coloured ? colour(state, for: leg.state) : state) + leg.device.padded(width)
                     + "  " + "\(leg.readErrors)/\(leg.writeErrors)".padded(19)
                     + (leg.why ?? leg.replaces.map { "replaces leg \($0) once in sync" } ?? leg.error ?? "-")
                     + (leg.writeMostly == true ? "  (write-mostly" + (leg.writesBehind.map { $0 > 0 ? ", \($0) writes behind" : "" } ?? "") + ")" : ""))
    }
    let resync = status.resync
    if resync.active {
        lines.append("resync (\(resync.reason)): \(resync.summary)")
        if coloured { lines.append(progressBar(done: resync.regionsDone, of: resync.regionsTotal)) }
    } else if !resync.lastResult.isEmpty {
        lines.append("last resync: \(resync.lastResult)")
    }
    if let scrub = status.scrub {
        if scrub.active {
            lines.append(scrub.summary)
            if coloured { lines.append(progressBar(done: scrub.regionsDone, of: scrub.regionsTotal)) }
        } else {
            lines.append("last \(scrub.lastResult)")
        }
    }
    return lines.joined(separator: "\n")
}


/// `text` in the colour of `state`: green in sync, yellow rebuilding, red degraded.
private func colour(_ text: String, for state: LegState) -> String {
    let code = switch state {
    case .inSync: "32"
    case .rebuilding: "33"
    case .degraded: "31;1"
    }
    return "\u{1B}[\(code)m\(text)\u{1B}[0m"
}

/// `[########------------]  40%`, 40 columns of bar.
private func progressBar(done: Int, of total: Int) -> String {
    let width = 40
    let filled = total > 0 ? min(width, done * width / total) : width
    let percent = total > 0 ? done * 100 / total : 100
    return "[" + String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled) + "] \(percent)%"
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show each mirror's legs, their health and the resync's progress.",
        discussion: """
            With no mirror named, every mirror served on this machine. With --watch, on a terminal the \
            table is redrawn every second (leg states in colour, a resync's progress bar); elsewhere (a \
            pipe, a journal) one line is printed each time the mirror changes, until the server stops.
            """)
    @Flag(help: "Keep watching: redraw on a terminal, a line a change elsewhere.") var watch = false
    @OptionGroup var options: ControlOptions

    func run() throws {
        guard watch else { return options.print(try options.reports().map(\.report)) }
        if options.json { throw CleanExit.message("--watch and --json: use `dmio-nbd events --json` for a stream", code: 64) }
        let control = try options.oneControl()
        if isatty(STDOUT_FILENO) == 1 {
            while true {
                let reports = try options.reports()
                Swift.print("\u{1B}[H\u{1B}[2J" + reports.map { describe($0.report, coloured: true) }.joined(separator: "\n\n"))
                fflush(stdout)
                sleep(1)
            }
        }
        // Not a terminal: a line a change, pushed by the server's events.
        let fd = try options.connect(control, sending: ControlRequest(command: .events, now: true))
        defer { close(fd) }
        var last = ""
        while let line = readLine(fd, limit: 1 << 20) {
            guard let event = try? JSONDecoder().decode(Event.self, from: Data(line.utf8)),
                  event.verb == "change" || event.verb == "resync" || (event.verb == "exists" && event.object == "-") else { continue }
            guard let report = try options.reports().first else { return }
            let summary = report.report.mirror.summaryLine
            if summary != last {
                Swift.print(summary)
                fflush(stdout)
                last = summary
            }
        }
    }
}

struct FailLeg: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fail-leg", abstract: "Take a leg out of the mirror (it is no longer read or written).")
    @Argument(help: "The leg's number (0 is the first).") var leg: Int
    @OptionGroup var options: ControlOptions
    func run() throws { try options.send(ControlRequest(command: .failLeg, leg: leg)) }
}

struct ReaddLeg: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "readd-leg", abstract: "Bring a degraded leg back; only the regions written meanwhile are copied.")
    @Argument(help: "The leg's number (0 is the first).") var leg: Int
    @OptionGroup var options: ControlOptions
    func run() throws { try options.send(ControlRequest(command: .readdLeg, leg: leg)) }
}

struct ReplaceLeg: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "replace-leg", abstract: "Put a new device in place of a leg; it gets a full copy, online.",
        discussion: """
            A leg in sync stays in service, read and written, until the new one has its copy; then the new one takes its place and it leaves the mirror (md's --replace). Any other leg is replaced at once.
            """)
    @Argument(help: "The leg's number (0 is the first).") var leg: Int
    @Argument(help: "The new leg: a file, a block device or an NBD URI, at least as large as the others.") var device: String
    @Flag(help: "Overwrite a device that holds a file system or a partition table.") var force = false
    @OptionGroup var options: ControlOptions
    func run() throws {
        // The server resolves nothing: it may stand in another folder.
        try options.send(ControlRequest(command: .replaceLeg, leg: leg, device: absolutePath(device), force: force))
    }
}

struct AddLeg: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "add-leg", abstract: "Grow the mirror by a leg (up to 64), online; it gets a full copy.",
        discussion: """
            The new leg is written from the start and read once its copy has ended. Its place is after             the others: give it last on the serve command line from now on.
            """)
    @Argument(help: "The new leg: a file, a block device or an NBD URI, at least as large as the others.") var device: String
    @Flag(help: "Overwrite a device that holds a file system or a partition table.") var force = false
    @OptionGroup var options: ControlOptions
    func run() throws {
        try options.send(ControlRequest(command: .addLeg, device: absolutePath(device), force: force))
    }
}

struct RemoveLeg: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "remove-leg", abstract: "Take a leg out of the mirror for good; the legs after it move down one.",
        discussion: """
            Its superblock then says it was removed: it is never served as one of the mirror's legs             again (`dmio-nbd wipe` frees it for another use). Leave it off the serve command line from now             on. Refused for the last leg in sync, and when fewer than two legs would be left.
            """)
    @Argument(help: "The leg's number (0 is the first).") var leg: Int
    @OptionGroup var options: ControlOptions
    func run() throws { try options.send(ControlRequest(command: .removeLeg, leg: leg)) }
}

struct SetLeg: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "set-leg", abstract: "Change how a leg is used, online; recorded in the legs' superblocks.",
        discussion: """
            A write-mostly leg is read only when no other leg in sync can be (md's write-mostly): a slow \
            or remote leg. With --write-behind (on by default) a write is answered once the other legs in \
            sync have it, and goes on to the write-mostly legs behind the answer.
            """)
    @Argument(help: "The leg's number (0 is the first).") var leg: Int
    @Flag(inversion: .prefixedNo, help: "Read the leg only when no other leg in sync can be; write it behind.")
    var writeMostly: Bool
    @OptionGroup var options: ControlOptions
    func run() throws { try options.send(ControlRequest(command: .setLeg, leg: leg, writeMostly: writeMostly)) }
}

struct Events: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print each change of a mirror as it happens, one line each, until the server stops.",
        discussion: """
            Lines as drbdsetup's events2: `change leg mirror:UUID leg:1 state:in_sync->degraded cause:write \
            errno:ENOSPC`, `resync started|progress|finished ...`, `metadata written ...`, \
            `connection opened|closed ...`. A watcher too slow to read them is dropped, with a last line \
            `dropped - reason:...`, and exits 1, as when the server refuses it (`refused - reason:...`).
            """)
    @Flag(help: "First the mirror as it is: `exists` lines, then `exists -`.") var now = false
    @OptionGroup var options: ControlOptions

    func run() throws {
        let fd = try options.connect(try options.oneControl(), sending: ControlRequest(command: .events, now: now))
        defer { close(fd) }
        while let line = readLine(fd, limit: 1 << 20) {
            guard let event = try? JSONDecoder().decode(Event.self, from: Data(line.utf8)) else {
                throw CleanExit.message("the server cut this watcher in the middle of an event (it read too slowly), "
                                        + "or it is another version of dmio-nbd", code: 1)
            }
            if options.json {
                let fields = Dictionary(event.fields.map { ($0.key, $0.value) }) { first, _ in first }
                print(encodeJSON(fields.merging(["verb": event.verb, "object": event.object]) { first, _ in first }))
            } else {
                print(event.line)
            }
            // A pipe (a script, a journal) gets each line as it happens.
            fflush(stdout)
            if event.verb == "dropped" || event.verb == "refused" {
                throw CleanExit.message("the server \(event.verb) this watcher: \(event["reason"] ?? "no reason given")",
                                        code: 1)
            }
        }
    }
}

/// A control socket that could not be reached.
struct ControlUnreachable: Error, CustomStringConvertible {
    let path: String
    let errno: Int32

    var description: String {
        "cannot reach the mirror's control socket \(path): \(errnoDescription(errno))"
            + (errno == EACCES ? "; run this as the user who serves the mirror" : "")
    }
}
