import BlockTargets
import DMIO
import Glibc
import Logging
import Mirror
import Monitoring

/// `serve --on-event PROGRAM`, with mdadm --monitor --program's contract:
/// for each event of mdadm's kinds, `PROGRAM EVENT MIRROR [LEG-DEVICE]`,
/// with DRBD-style variables in its environment (DMIO_MIRROR, DMIO_LEG,
/// DMIO_LEG_DEVICE, DMIO_ERRNO, DMIO_STATE_LINE: the event's line). The
/// calls run one at a time, in order, on a thread of their own: the mirror
/// never waits for one. A program still running after `timeout` is killed,
/// with its process group.
///
/// mdadm's events, from the mirror's: `Fail` (a leg in sync went out),
/// `FailSpare` (a leg being copied to went out), `DegradedArray` (a leg is
/// out when the server starts: as mdadm, only when it first sees the
/// mirror, not at a failure, which is `Fail`), `RebuildStarted`,
/// `RebuildNN` (as a resync passes each `increment` percent: mdadm's
/// --increment, 20 by default), `RebuildFinished`, `SpareActive` (a leg
/// copied to is in sync), `TestMessage` (at the start, with --test-event).
/// A new or re-added leg being copied to is `rebuilding`, not out: no alarm.
final class EventHooks: Sendable {
    static let defaultTimeout = Duration.seconds(30)
    static let defaultIncrement = 20

    private let program: String
    private let timeout: Duration
    private let hub: EventHub
    private let logger: Logger

    /// Starts calling `program` for the events `hub` gets from now on;
    /// `status` reads the mirror as it is (now, and after events were lost).
    init(program: String, hub: EventHub, status: @escaping @Sendable () -> MirrorStatus, timeout: Duration,
         increment: Int, test: Bool, logger: Logger) throws(EventHub.Refusal) {
        self.program = program
        self.timeout = timeout
        self.hub = hub
        self.logger = logger
        var translator = HookTranslator(status(), increment: increment)
        let first = translator.startCalls(test: test)
        try hub.listen(named: "dmio-hooks", watcher: false, overflow: .forget, accepts: HookTranslator.wants) {
            [self] queue in
            for call in first { run(call) }
            while true {
                switch queue.next() {
                case .event(let event):
                    for call in translator.calls(for: event) { run(call) }
                case .overflowed:
                    // The program ran slower than the mirror changed: go on
                    // from the mirror as it is, so that the next change is
                    // told right.
                    logger.error("event hook \(program): events came faster than it ran; some were not run")
                    translator = HookTranslator(status(), increment: increment)
                case .closed, .idle:
                    return
                }
            }
        }
    }

    private func run(_ call: HookCall) {
        let arguments = [program, call.event, call.mirror] + (call.device.map { [$0] } ?? [])
        guard !hub.isAbandoned else {
            logger.warning("event hook: \(arguments.joined(separator: " ")) not run: the server stopped")
            return
        }
        var environment = ProcessEnvironment.current.filter { !$0.hasPrefix("DMIO_") }
        environment += ["DMIO_EVENT=\(call.event)", "DMIO_MIRROR=\(call.mirror)", "DMIO_STATE_LINE=\(call.line)"]
        if let leg = call.leg { environment.append("DMIO_LEG=\(leg)") }
        if let device = call.device { environment.append("DMIO_LEG_DEVICE=\(device)") }
        if let errno = call.errno { environment.append("DMIO_ERRNO=\(errno)") }
        switch spawnAndWait(arguments, environment: environment, timeout: timeout, giveUp: { hub.isAbandoned }) {
        case .exited(0):
            logger.info("event hook: \(arguments.joined(separator: " "))")
        case .exited(let status):
            logger.warning("event hook: \(arguments.joined(separator: " ")) exited with status \(status)")
        case .signalled(let signal):
            logger.warning("event hook: \(arguments.joined(separator: " ")) was killed by signal \(signal)")
        case .timedOut:
            logger.error("event hook: \(arguments.joined(separator: " ")) ran past \(timeout): killed")
        case .gaveUp:
            logger.error("event hook: \(arguments.joined(separator: " ")) still ran when the server stopped: killed")
        case .cannotRun(let error):
            logger.error("event hook: cannot run \(program): \(errnoDescription(error))")
        case .cannotWait(let error):
            logger.error("event hook: \(arguments.joined(separator: " ")) could not be waited for: \(errnoDescription(error))")
        }
    }
}

/// The process's environment, as `NAME=value` strings.
enum ProcessEnvironment {
    static var current: [String] {
        var entries: [String] = []
        var pointer = environ
        while let entry = pointer.pointee {
            entries.append(String(cString: entry))
            pointer += 1
        }
        return entries
    }
}

enum SpawnResult {
    case exited(Int32)
    case signalled(Int32)
    case timedOut
    /// `giveUp` said so: the program was killed.
    case gaveUp
    case cannotRun(errno: Int32)
    case cannotWait(errno: Int32)
}

/// Runs `arguments` (the program found on PATH) in a process group of its
/// own, with the signals this server ignores back at their defaults, and
/// waits for it at most `timeout`, or until `giveUp` (the server stops):
/// then the group is killed.
func spawnAndWait(_ arguments: [String], environment: [String], timeout: Duration,
                  giveUp: () -> Bool) -> SpawnResult {
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    var defaults = sigset_t()
    sigemptyset(&defaults)
    for signal in [SIGTERM, SIGINT, SIGHUP, SIGPIPE] { sigaddset(&defaults, signal) }
    var noMask = sigset_t()
    sigemptyset(&noMask)
    posix_spawnattr_setsigdefault(&attributes, &defaults)
    posix_spawnattr_setsigmask(&attributes, &noMask)
    posix_spawnattr_setpgroup(&attributes, 0)
    posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
    let argv = arguments.map { strdup($0) } + [nil]
    let envp = environment.map { strdup($0) } + [nil]
    defer { for pointer in argv + envp { free(pointer) } }
    var pid = pid_t()
    let spawned = posix_spawnp(&pid, arguments[0], nil, &attributes, argv, envp)
    guard spawned == 0 else { return .cannotRun(errno: spawned) }
    let deadline = ContinuousClock.now + timeout
    var status: Int32 = 0
    while true {
        let waited = waitpid(pid, &status, WNOHANG)
        if waited == pid { break }
        if waited < 0 && errno != EINTR { return .cannotWait(errno: errno) }
        let timedOut = ContinuousClock.now >= deadline
        if timedOut || giveUp() {
            kill(-pid, SIGKILL)
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            return timedOut ? .timedOut : .gaveUp
        }
        usleep(10_000)
    }
    // WIFEXITED / WEXITSTATUS / WTERMSIG, which Swift does not import.
    return status & 0x7F == 0 ? .exited((status >> 8) & 0xFF) : .signalled(status & 0x7F)
}
