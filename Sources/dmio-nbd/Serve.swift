import ArgumentParser
import BlockTargets
import CDMIOSupport
import DMIO
import Dispatch
import Glibc
import Logging
import Mirror
import Monitoring
import NBD

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve a mirror of two or more legs, or one device, over NBD.",
        discussion: """
            With no LEG, serves the default mirror: two sparse 1 GiB legs in \
            \(DefaultMirror.folderDescription), made on first use. With two or more, serves \
            the mirror whose legs they are (made by `dmio-nbd create`, or here with --create \
            when none of them exists yet). With one, serves that device as it is.

            A LEG is a file, a block device, or an NBD URI (nbd://host:port/name, \
            nbd+unix:///name?socket=PATH). With neither --socket nor --tcp the server \
            listens on \(defaultSocketPath). A mirror's control socket is \
            \(ControlFolder.path)/UUID.ctl unless --control says otherwise. It stays in the \
            foreground; SIGTERM, SIGINT or SIGHUP stop it once every request in flight is \
            answered and flushed, however long that takes; a second signal stops it at once \
            (a mirror then resyncs its dirty regions at its next start).

            Attach it with:  nbd-client -unix \(defaultSocketPath) /dev/nbd0
            Inspect it with: nbdinfo 'nbd+unix:///?socket=\(defaultSocketPath)'
            """)

    @Argument(help: "The legs of the mirror, or the one device to serve.")
    var legs: [String] = []

    @Option(help: "Listen on this unix socket.")
    var socket: String?

    @Option(help: ArgumentHelp("Listen on TCP: host:port, host (port 10809) or :port.", valueName: "host:port"))
    var tcp: TCPAddress?

    @OptionGroup(title: "TLS")
    var tls: ServerTLSOptions

    @OptionGroup(title: "Remote legs over TLS")
    var remoteTLS: RemoteTLSOptions

    @Option(help: ArgumentHelp("The mirror's control socket (default: \(ControlFolder.path)/UUID.ctl).",
                               valueName: "path"))
    var control: String?

    @Option(help: ArgumentHelp("Write the server's pid here once it serves (every socket listens, the mirror "
                               + "is open); removed at the stop.", valueName: "path"))
    var pidfile: String?

    @Option(help: "The export's name.")
    var export = ""

    @Option(help: "A description of the export, shown by nbdinfo.")
    var description: String?

    @Flag(help: "Serve reads only (one device only).")
    var readOnly = false

    @Option(help: ArgumentHelp("Create missing legs as sparse files of this size (e.g. 512M, 1G); "
                               + "a new mirror when none of them exists.", valueName: "size"),
            transform: ByteSize.parse)
    var create: ByteSize?

    @Option(help: ArgumentHelp("Region size of a mirror made by --create (default 512K).", valueName: "size"),
            transform: ByteSize.parse)
    var regionSize: ByteSize?

    @Option(help: ArgumentHelp("Copy at most this many bytes a second when resyncing (e.g. 100M; default: no limit).",
                               valueName: "size"),
            transform: ByteSize.parse)
    var resyncRate: ByteSize?

    @Option(help: ArgumentHelp("Which in-sync leg a read goes to: balanced (a read that continues the last one "
                               + "stays on its leg, others go to the leg with the fewest reads in flight) or first "
                               + "(the first in-sync leg, others only when it fails); default: balanced.", valueName: "policy"))
    var readPolicy: ReadPolicy?

    @Option(help: ArgumentHelp("Writes need this many legs in sync (default 1: any leg in sync takes writes); "
                               + "with fewer, --on-lost-redundancy says what a write does.", valueName: "count"))
    var minInSyncLegs: Int?

    @Option(help: ArgumentHelp("What a write does when fewer than --min-in-sync-legs legs are in sync: fail "
                               + "(EIO, the default) or hold (it waits until a leg's copy ends, or the server stops).",
                               valueName: "fail|hold"))
    var onLostRedundancy: RedundancyPolicy.OnLoss?

    @Option(help: ArgumentHelp("Make leg N write-mostly (recorded in the superblocks; `set-leg N --no-write-mostly` "
                               + "undoes it): read only when no other leg in sync can be, and written behind. "
                               + "Give it once per leg.", valueName: "N"))
    var writeMostly: [Int] = []

    @Option(help: ArgumentHelp("Answer a write once the legs in sync that are not write-mostly have it, with up to "
                               + "this many writes outstanding to each write-mostly leg (default 256, as md; 0: "
                               + "write-mostly legs are waited for as the others).", valueName: "N"))
    var writeBehind = WriteBehindPolicy.default.limit

    @Option(help: ArgumentHelp("What a write does when a write-mostly leg has --write-behind writes outstanding: "
                               + "block (it waits for that leg, the default) or pull-ahead (that leg is no longer "
                               + "written, its regions stay dirty, and it is caught up once its backlog drains).",
                               valueName: "block|pull-ahead"))
    var onCongestion: CongestionPolicy = WriteBehindPolicy.default.onCongestion

    @Flag(help: "Bypass the page cache (O_DIRECT) for files and block devices.")
    var direct = false

    @Flag(help: "Serve one device even if it is a leg of a mirror (writes to it bypass the mirror).")
    var force = false

    @Flag(help: "Start a mirror without legs that cannot be opened, even those the others last saw in sync.")
    var allowMissingLegs = false

    @Option(help: ArgumentHelp("Give up on a remote leg that connects, or owes replies, and stays silent this long: "
                               + "its requests fail with ETIMEDOUT and it is degraded (0: wait for ever).",
                               valueName: "seconds"))
    var remoteTimeout = Int(DeviceOptions.defaultRemoteTimeout.components.seconds)

    @OptionGroup var connectionOptions: RemoteConnectionOptions

    @Option(help: ArgumentHelp("Try a remote leg whose server went away (or stopped answering) again after this many "
                               + "seconds, then twice as long each time up to a minute, and take it back once it "
                               + "answers as the same leg (0: never; an operator re-adds it).",
                               valueName: "seconds"))
    var reconnectInterval: Double = 2

    @Option(help: ArgumentHelp("Hold the legs with a lease of this many seconds, renewed every fifth of it, so that a "
                               + "server on another machine never writes them at the same time (default 10 for a "
                               + "mirror with a remote leg, else 0: none).", valueName: "seconds"))
    var lease: Double?

    @Option(help: ArgumentHelp("This machine's id in the legs' lease (default: /etc/machine-id).", valueName: "uuid"))
    var hostID: String?

    @Flag(help: "Take legs over from a server on another machine whose lease has run out (a failover).")
    var takeover = false

    @Option(help: ArgumentHelp("Buffer at most about this many bytes of requests and replies, all clients together "
                               + "(default 256M): beyond it, reads wait and no new request is read.",
                               valueName: "size"),
            transform: ByteSize.parse)
    var bufferLimit: ByteSize?

    @Option(help: "I/O engine: io_uring or threads (default: io_uring where the kernel allows it).")
    var engine: IOEngineKind?

    @Option(help: ArgumentHelp("Serve Prometheus metrics at http://ADDRESS/metrics: host:port, :port, or unix:PATH.",
                               valueName: "address"))
    var metrics: MetricsAddress?

    @Option(name: .customLong("on-event"),
            help: ArgumentHelp("Run PROGRAM for each event, as mdadm --monitor --program: PROGRAM EVENT MIRROR "
                               + "[LEG-DEVICE], with DMIO_* variables (README, 'Watching it').", valueName: "program"))
    var eventProgram: String?

    @Option(name: .customLong("on-event-timeout"),
            help: ArgumentHelp("Kill an event program still running after this many seconds.", valueName: "seconds"))
    var eventTimeout = Int(EventHooks.defaultTimeout.components.seconds)

    @Option(name: .customLong("on-event-increment"),
            help: ArgumentHelp("Run the event program with RebuildNN each time a resync passes a multiple of this "
                               + "many percent (mdadm's --increment).", valueName: "percent"))
    var eventIncrement = EventHooks.defaultIncrement

    @Flag(name: .customLong("test-event"), help: "Run the event program once at the start with TestMessage.")
    var testEvent = false

    @Flag(name: .shortAndLong, help: "Log each connection and refused request.")
    var verbose = false

    func validate() throws {
        if let twice = duplicate(in: legs) { throw ValidationError("\(twice) is given twice") }
        try checkLegSpecs(legs)
        if readOnly && legs.count != 1 { throw ValidationError("--read-only serves one device; a mirror is always writable") }
        if remoteTimeout < 0 { throw ValidationError("--remote-timeout: \(remoteTimeout) seconds is negative") }
        if let lease, !(lease == 0 || (lease >= 1 && lease <= 600)) {
            throw ValidationError("--lease: \(lease) seconds is not 0 (none) or between 1 and 600")
        }
        if !(reconnectInterval >= 0 && reconnectInterval <= 3600) {
            throw ValidationError("--reconnect-interval: \(reconnectInterval) seconds is not between 0 and 3600")
        }
        if !(0...WriteBehindPolicy.maxLimit).contains(writeBehind) {
            throw ValidationError("--write-behind: \(writeBehind) is not between 0 and \(WriteBehindPolicy.maxLimit)")
        }
        if onCongestion == .pullAhead && writeBehind == 0 {
            throw ValidationError("--on-congestion pull-ahead: with --write-behind 0 nothing is written behind, "
                                  + "so no leg's backlog can fill")
        }
        if !writeMostly.isEmpty && legs.count == 1 { throw ValidationError("--write-mostly marks a mirror's legs; one device has one") }
        if let leg = writeMostly.first(where: { $0 < 0 || $0 >= max(legs.count, 2) }) {
            throw ValidationError("--write-mostly \(leg): the mirror has legs 0 to \(max(legs.count, 2) - 1)")
        }
        if eventTimeout < 1 { throw ValidationError("--on-event-timeout: at least 1 second") }
        if eventProgram != nil && legs.count == 1 { throw ValidationError("--on-event watches a mirror; one device has no events") }
        if onLostRedundancy != nil && (minInSyncLegs ?? 1) < 2 {
            throw ValidationError("--on-lost-redundancy says what a write does with fewer than --min-in-sync-legs legs "
                                  + "in sync: give --min-in-sync-legs 2 or more with it")
        }
        if (minInSyncLegs != nil || onLostRedundancy != nil) && legs.count == 1 {
            throw ValidationError("--min-in-sync-legs and --on-lost-redundancy count a mirror's legs; one device has one")
        }
        if let minInSyncLegs, minInSyncLegs < 1 || minInSyncLegs > max(legs.count, 2) {
            throw ValidationError("\(MirrorError.invalidMinInSync(minInSyncLegs, legCount: max(legs.count, 2)))")
        }
        if readPolicy != nil && legs.count == 1 { throw ValidationError("--read-policy picks among a mirror's legs; one device has one") }
        if testEvent && eventProgram == nil { throw ValidationError("--test-event needs --on-event PROGRAM") }
        if !(1...99).contains(eventIncrement) { throw ValidationError("--on-event-increment: 1 to 99 percent") }
        if let bufferLimit, bufferLimit.bytes < 1 << 20 {
            throw ValidationError("--buffer-limit \(bufferLimit): at least 1M (one request of up to 32M may pass it anyway)")
        }
    }

    func run() async throws {
        // First: it unsets NOTIFY_SOCKET, so that no leg's helper or event
        // program started later notifies systemd for us.
        let notifier = ServiceNotifier()
        // Before anything is opened: a signal during a long start-up (remote
        // legs that take their time) is a clean stop too.
        let stops = StopSignals()
        // Socket reads land in buffers of up to 256 KiB that the writes in
        // them keep alive, so they are freed and allocated all the time;
        // glibc would hand each back to the kernel and fault it in again.
        // The server hands them back once a burst is over (NBDServer).
        dmio_keep_freed_buffers(16 << 20)
        let logger = makeLogger(verbose: verbose)
        stops.whenForced { signal in
            logger.warning("\(signal) again: stopping now, without answering the requests in flight; a mirror resyncs its dirty regions at its next start")
        }
        // The credentials and the sockets first: a refusal there (a missing
        // certificate, a port in use, a missing folder) comes before any leg
        // is opened, and no metadata is written.
        let serverTLS = try tls.load()
        let listeners = try listeningSockets()
        warnIfOpen(listeners, tls: serverTLS, logger: logger)
        var controlListener: Listener?
        var metricsListener: Listener?
        let events = EventHub()
        let served: ServedTarget
        do {
            metricsListener = try metrics?.bind()
            if legs.count != 1 { controlListener = try bindControl() }
            let client = try DMIOClient(engine: engine.map { .only($0) } ?? .automatic)
            served = legs.count == 1
                ? try serveOne(client: client, logger: logger)
                : try serveMirror(client: client, control: &controlListener, events: events, stops: stops, logger: logger)
        } catch {
            for listener in listeners + [controlListener, metricsListener].compactMap({ $0 }) { listener.close() }
            if case StartInterrupted.before(let signal) = error {
                logger.info("\(signal) during start-up: stopped before the mirror started (nothing was written)")
                return
            }
            throw error
        }
        // Request metrics count in a decorator over the target, stacked only when asked for.
        let counted = metrics == nil ? nil : StatsTarget(served.target)
        let server = NBDServer(
            exports: [Export(name: export, description: description, readOnly: readOnly, target: counted ?? served.target)],
            tls: serverTLS, ringPerLoop: served.engineKind == .ioUring,
            bufferLimit: Int(clamping: bufferLimit?.bytes ?? UInt64(NBDServer.defaultBufferLimit)),
            events: (served.target as? Mirror).map { ServerEventSink(hub: events, mirror: "\($0.uuid)") }, logger: logger)
        /// The shutdown waits for every request in flight: a write held for
        /// want of legs in sync fails first, or it would wait for ever.
        func shutDownServer() async {
            (served.target as? Mirror)?.stopHoldingWrites()
            await server.shutdown()
        }
        var pidFile: PidFile?
        var metricsEndpoint: MetricsEndpoint?
        do {
            for listener in listeners {
                do {
                    try await server.serve(listening: listener.socket, address: listener.address)
                } catch {
                    throw CleanExit.message("cannot serve on \(listener.address): \(error)", code: 1)
                }
                let tlsNote = serverTLS.map { ", TLS \($0.policy) with \($0.summary)" } ?? ""
                logger.info("serving \(served.summary) (\(served.target.size) bytes, engine \(served.engineKind)) on \(listener.address)\(tlsNote)")
            }
            if let metricsListener, let counted {
                let sources = MetricsSources(version: dmioVersion, requests: counted.statistics,
                                             mirror: served.target as? Mirror, connections: { server.connectionCount })
                metricsEndpoint = try await MetricsEndpoint.start(on: metricsListener, sources: sources, logger: logger)
            }
            pidFile = try self.pidfile.map { try PidFile.write(absolutePath($0)) }
        } catch {
            // Nothing was served: the mirror stops cleanly all the same.
            await shutDownServer()
            await metricsEndpoint?.stop()
            if metricsEndpoint == nil { metricsListener?.close() }
            served.stop()
            events.close(within: .seconds(eventTimeout))
            controlListener?.close()
            for listener in listeners { listener.removeFile() }
            throw error
        }
        let controlServer = controlListener.map { listener in
            ControlServer(listener: listener, mirror: served.target as! Mirror,
                          served: listeners.map { "\($0.address)" }, events: events, logger: logger)
        }
        notifier?.ready(status: served.statusLine)
        if legs.isEmpty, case .unix(let path) = listeners.last?.address { printAttachLines(socketPath: path) }

        let signal = await stops.wait()
        logger.info("\(stops.reason ?? signal): answering the requests in flight, then stopping")
        notifier?.stopping("\(signal): answering the requests in flight, then stopping")
        // In order: no new connection or request, the requests in flight
        // answered, the mirror's metadata written clean, then the control
        // socket (status answers until the mirror is stopped).
        await shutDownServer()
        served.stop()
        // Watchers and the event program get what happened up to here, then
        // the end; a program still running after its timeout is killed.
        events.close(within: .seconds(eventTimeout))
        controlServer?.stop()
        await metricsEndpoint?.stop()
        for listener in listeners { listener.removeFile() }
        pidFile?.remove()
        logger.info("stopped")
        if let reason = stops.reason { throw CleanExit.message("stopped: \(reason)", code: 1) }
    }

    /// The NBD sockets: handed over by socket activation, else bound and
    /// listening: --tcp, --socket, or the default socket.
    private func listeningSockets() throws -> [Listener] {
        guard let activated = try SocketActivation.listeners() else { return try bindListeners() }
        if socket != nil || tcp != nil {
            for listener in activated { listener.close() }
            throw CleanExit.message("--socket and --tcp cannot be given with socket activation (LISTEN_FDS): "
                                    + "the service manager chose the sockets", code: 1)
        }
        return activated
    }

    /// The NBD sockets, bound and listening: --tcp, --socket, or the default socket.
    private func bindListeners() throws -> [Listener] {
        var listeners: [Listener] = []
        do {
            if let tcp { listeners.append(try Listener.tcp(tcp)) }
            if let socket {
                listeners.append(try Listener.unix(absolutePath(socket)))
            } else if tcp == nil {
                listeners.append(try Listener.unix(defaultSocketPath, hint: "use --socket or set XDG_RUNTIME_DIR"))
            }
        } catch {
            for listener in listeners { listener.close() }
            throw error
        }
        return listeners
    }

    /// Who can reach a TCP port without TLS can read and write the device.
    private func warnIfOpen(_ listeners: [Listener], tls: ServerTLS?, logger: Logger) {
        guard tls?.policy != .require else { return }
        for listener in listeners {
            guard case .tcp(_, let port) = listener.address else { continue }
            let offered = tls == nil ? "" : " (TLS is offered, not required)"
            logger.warning("TCP port \(port) without --tls=require: anyone who can reach it can read and write the device\(offered)")
        }
    }

    /// The mirror's control socket, mode 0600 (only its owner may change the
    /// mirror): at --control, or under a name of its own in the control
    /// folder until the mirror's UUID is known.
    private func bindControl() throws -> Listener {
        if let control { return try Listener.unix(absolutePath(control), mode: 0o600) }
        let folder = try ControlFolder.make()
        return try Listener.unix("\(folder)/.starting-\(getpid()).ctl", mode: 0o600,
                                 hint: "use --control or set XDG_RUNTIME_DIR")
    }

    private func deviceOptions(createSize: UInt64?) -> DeviceOptions {
        var options = DeviceOptions(readOnly: readOnly, direct: direct, createSize: createSize,
                                    remoteTimeout: remoteTimeout == 0 ? nil : .seconds(remoteTimeout),
                                    remoteTLS: remoteTLS.settings, remoteConnections: connectionOptions.remoteConnections)
        // The legs' metrics count every bio (a mirror's: one device served has no leg metrics).
        options.countsRequests = metrics != nil && legs.count != 1
        return options
    }

    private func serveOne(client: DMIOClient, logger: Logger) throws -> ServedTarget {
        let device = try openLeg(legs[0], options: deviceOptions(createSize: create?.bytes), logger: logger)
        let owner: MirrorUUID?
        do {
            owner = try Mirror.mirrorOwning(device, client: client)
        } catch {
            guard force else {
                throw CleanExit.message("\(error): it may be a leg of a mirror; serve it raw only if it is not, "
                                        + "with --force (which can destroy that metadata)", code: 1)
            }
            owner = nil
        }
        // A leg served raw takes its mirror's lock: never while the mirror runs.
        var mirrorLock: MirrorLock?
        if let owner {
            guard force else {
                throw CleanExit.message("\(legs[0]) is a leg of mirror \(owner): serve the mirror with all its legs "
                                        + "(or pass --force to serve this leg raw, which can destroy its metadata)", code: 1)
            }
            do {
                mirrorLock = try MirrorLock(owner)
                // Writes through a raw server reach this leg alone.
                if !readOnly { try Mirror.recordServedRaw(device, client: client) }
            } catch {
                throw CleanExit.message("\(error)", code: 1)
            }
        }
        let summary = legs[0]
        return ServedTarget(target: LinearTarget(device: device, client: client), summary: summary,
                            engineKind: client.engineKind, statusLine: { "serving \(summary)" }) {
            let flushed = try? client.sync(.flush, regions: [IORegion(device: device, sector: 0, count: 0)])
            if let flushed, !flushed.succeeded { logger.error("final flush failed: \(flushed)") }
            mirrorLock?.release()
        }
    }

    /// Opens the mirror (which writes nothing), names its control socket
    /// after it, and starts it. A signal before the start stops there; one
    /// during it, once the start is done.
    private func serveMirror(client: DMIOClient, control: inout Listener?, events: EventHub, stops: StopSignals,
                             logger: Logger) throws -> ServedTarget {
        let specs = legs.isEmpty ? try DefaultMirror.legPaths() : legs.map(absolutePath)
        let createSize = legs.isEmpty ? ByteSize("1G") : create
        try createMirrorIfMissing(specs, createSize: createSize, regionBytes: try checkedRegionBytes(regionSize),
                                  options: deviceOptions(createSize: nil), client: client, logger: logger)
        let mirror: Mirror
        do {
            mirror = try Mirror.open(specs, client: client, rateLimit: resyncRate?.bytes ?? 0,
                                     readPolicy: readPolicy ?? .balanced,
                                     redundancy: RedundancyPolicy(minInSync: minInSyncLegs ?? 1,
                                                                  onLoss: onLostRedundancy ?? .fail),
                                     reconnectAfter: reconnectInterval == 0 ? nil : .seconds(reconnectInterval),
                                     ownership: try ownership(of: specs, stops: stops),
                                     writeBehind: WriteBehindPolicy(limit: writeBehind, onCongestion: onCongestion),
                                     writeMostly: Set(writeMostly),
                                     deviceOptions: deviceOptions(createSize: nil),
                                     allowMissingLegs: allowMissingLegs, eventSink: events, logger: logger)
            if let signal = stops.received { throw StartInterrupted.before(signal) }
            // The mirror's lock is held now: a socket of its name is a dead server's.
            if self.control == nil { try control?.move(to: ControlFolder.socket(for: mirror.uuid)) }
            // Listening before the start: a resync it begins is an event too.
            if let eventProgram {
                do {
                    _ = try EventHooks(program: eventProgram, hub: events, status: { mirror.status },
                                       timeout: .seconds(eventTimeout), increment: eventIncrement, test: testEvent,
                                       logger: logger)
                } catch {
                    throw CleanExit.message("--on-event \(eventProgram): \(error)", code: 1)
                }
            }
            try mirror.start()
        } catch let error as MirrorError {
            throw CleanExit.message("\(error)", code: 1)
        }
        return ServedTarget(target: mirror, summary: "mirror \(mirror.uuid) of \(specs.joined(separator: " "))",
                            engineKind: client.engineKind, statusLine: { mirror.status.summaryLine }) {
            mirror.stop()
        }
    }

    private func printAttachLines(socketPath: String) {
        let name = export.isEmpty ? "" : " -N \(export)"
        print("""
            dmio-nbd: serving the default mirror (\(DefaultMirror.folder)) on \(socketPath)
              attach:  nbd-client -unix \(socketPath) /dev/nbd0\(name)
              inspect: nbdinfo 'nbd+unix:///\(export)?socket=\(socketPath)'
              status:  \(commandPath) status
            """)
        // Whoever reads this through a pipe (a journal, a script) gets it now.
        fflush(stdout)
    }
}

/// A stop signal that came while the mirror was being opened: nothing was
/// written, and nothing more is done.
enum StartInterrupted: Error {
    case before(String)
}

/// What `serve` serves, and what it does at a stop once no request is left.
struct ServedTarget {
    let target: any BlockTarget
    let summary: String
    let engineKind: IOEngineKind
    /// What the service manager shows (`systemctl status`).
    let statusLine: @Sendable () -> String
    let stop: () -> Void
}

func openLeg(_ spec: String, options: DeviceOptions, logger: Logger) throws -> BlockDevice {
    do {
        return try Mirror.openLeg(spec, options: options, logger: logger)
    } catch {
        throw CleanExit.message("leg \(error)", code: 1)
    }
}

extension Serve {
    /// The lease on the legs: by default only a mirror with a remote leg
    /// holds one (another machine can reach only those). Losing it stops
    /// the server, with exit status 1.
    func ownership(of specs: [String], stops: StopSignals) throws -> Ownership {
        let seconds = lease ?? (specs.contains(where: DeviceSpec.isURI) ? 10 : 0)
        let me: MirrorOwner?
        do {
            me = try MirrorOwner.local(hostID: hostID, lease: .seconds(max(seconds, 1)))
        } catch {
            // Without an identity a lease cannot be held, nor told from another machine's.
            if seconds > 0 || hostID != nil { throw CleanExit.message("\(error)", code: 1) }
            me = nil
        }
        return Ownership(me: me, holdsLease: seconds > 0, takeover: takeover) { reason in
            stops.request(StopSignals.ownershipLost, because: reason)
        }
    }
}

/// With `createSize`, makes missing legs as sparse files and, when none
/// existed, a new mirror of them, in sync (they are all zeroes). Some
/// existing and some missing is refused: a new leg joins a mirror through
/// `replace-leg`, which copies the data to it.
func createMirrorIfMissing(_ specs: [String], createSize: ByteSize?, regionBytes: UInt32, options: DeviceOptions,
                           client: DMIOClient, logger: Logger) throws {
    let missing = specs.filter { !DeviceSpec.isURI($0) && access($0, F_OK) != 0 }
    guard let createSize, !missing.isEmpty else { return }
    try checkLegSize(createSize, regionBytes: regionBytes)
    guard missing.count == specs.count else {
        throw CleanExit.message("legs \(missing.joined(separator: ", ")) do not exist but the others do; "
                                + "to put a new leg in a mirror, serve the mirror and run `dmio-nbd replace-leg`", code: 1)
    }
    var creating = options
    creating.createSize = createSize.bytes
    // Only the files this start made are removed if it fails: another
    // start may have made (and be serving) the rest meanwhile.
    var made: [String] = []
    do {
        var devices: [BlockDevice] = []
        for spec in specs {
            let device = try openLeg(spec, options: creating, logger: logger)
            if device.wasCreated { made.append(spec) }
            devices.append(device)
        }
        guard made.count == specs.count else {
            throw CleanExit.message("legs \(specs.filter { !made.contains($0) }.joined(separator: ", ")) appeared while "
                                    + "the mirror was being made (another dmio-nbd?); nothing was written to them", code: 1)
        }
        let uuid = try Mirror.create(devices, client: client, regionBytes: regionBytes, fresh: true)
        logger.info("made mirror \(uuid) of \(specs.joined(separator: " "))")
    } catch {
        for path in made { unlink(path) }
        throw error is CleanExit ? error : CleanExit.message("\(error)", code: 1)
    }
}

/// Refuses, before anything is opened, a leg that no driver can open as
/// written: a URI of a scheme none takes, or a bad `connections=`.
func checkLegSpecs(_ specs: [String]) throws {
    for spec in specs {
        do { _ = try DeviceSpec(spec) } catch { throw ValidationError("leg \(error)") }
    }
}

/// A leg named twice (the same path, or the same URI).
func duplicate(in specs: [String]) -> String? {
    var seen: Set<String> = []
    for spec in specs {
        let resolved = DeviceSpec.isURI(spec) ? spec : (realpath(spec, nil).map { path in
            defer { free(path) }
            return String(cString: path)
        } ?? spec)
        if !seen.insert(resolved).inserted { return spec }
    }
    return nil
}

/// The mirror `dmio-nbd` serves when given no legs: in the user's data
/// folder (XDG's base directories), not in whatever folder one stands in.
enum DefaultMirror {
    /// $XDG_DATA_HOME/dmio-nbd, else ~/.local/share/dmio-nbd.
    static var folder: String {
        if let data = environment("XDG_DATA_HOME") { return data + "/dmio-nbd" }
        let home = environment("HOME") ?? getpwuid(getuid()).flatMap { $0.pointee.pw_dir.map { String(cString: $0) } } ?? "/"
        return (home == "/" ? "" : home) + "/.local/share/dmio-nbd"
    }

    static let folderDescription = "$XDG_DATA_HOME/dmio-nbd (~/.local/share/dmio-nbd)"

    /// The legs' paths, with their folder made (and its parents) if missing.
    static func legPaths() throws -> [String] {
        var made = ""
        for part in folder.split(separator: "/") {
            made += "/" + part
            if mkdir(made, 0o755) != 0 && errno != EEXIST {
                throw CleanExit.message("cannot make \(made): \(errnoDescription(errno))", code: 1)
            }
        }
        return ["\(folder)/leg0.img", "\(folder)/leg1.img"]
    }
}

/// An exit with a message for the person who ran the command.
enum CleanExit: Error, CustomStringConvertible {
    case message(String, code: Int32)
    var description: String {
        switch self { case .message(let text, _): text }
    }
    var code: Int32 {
        switch self { case .message(_, let code): code }
    }
}

extension IOEngineKind: ExpressibleByArgument {}
extension ReadPolicy: ExpressibleByArgument {}
extension RedundancyPolicy.OnLoss: ExpressibleByArgument {}
extension CongestionPolicy: ExpressibleByArgument {}
extension TCPAddress: ExpressibleByArgument {}
