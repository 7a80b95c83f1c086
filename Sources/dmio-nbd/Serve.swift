import ArgumentParser
import DMIO
import Dispatch
import Glibc
import Logging
import NBD

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve a file, a block device or an NBD export over NBD.",
        discussion: """
            LEG is a file, a block device, or an NBD URI (nbd://host:port/name, \
            nbd+unix:///name?socket=PATH). With neither --socket nor --tcp the server \
            listens on \(defaultSocketPath). It stays in the foreground; SIGTERM or \
            SIGINT stop it once the requests in flight are done and flushed.

            Attach it with:  nbd-client -unix \(defaultSocketPath) /dev/nbd0 -N NAME
            Inspect it with: nbdinfo 'nbd+unix:///NAME?socket=\(defaultSocketPath)'
            """)

    @Argument(help: "The device to serve.")
    var leg: String

    @Option(help: "Listen on this unix socket.")
    var socket: String?

    @Option(help: ArgumentHelp("Listen on TCP: host:port, host (port 10809) or :port.", valueName: "host:port"))
    var tcp: TCPAddress?

    @Option(help: "The export's name.")
    var export = ""

    @Option(help: "A description of the export, shown by nbdinfo.")
    var description: String?

    @Flag(help: "Serve reads only.")
    var readOnly = false

    @Option(help: ArgumentHelp("Create LEG as a sparse file of this size if it is missing (e.g. 512M, 1G).",
                               valueName: "size"))
    var create: ByteSize?

    @Flag(help: "Bypass the page cache (O_DIRECT) for files and block devices.")
    var direct = false

    @Option(help: "I/O engine: io_uring or threads (default: io_uring where the kernel allows it).")
    var engine: IOEngineKind?

    @Flag(name: .shortAndLong, help: "Log each connection and refused request.")
    var verbose = false

    func run() async throws {
        let logger = makeLogger(verbose: verbose)
        let client = try DMIOClient(engine: engine.map { .only($0) } ?? .automatic)
        let device: BlockDevice
        do {
            device = try BlockDevice.open(leg, options: DeviceOptions(
                readOnly: readOnly, direct: direct, createSize: create?.bytes))
        } catch {
            throw CleanExit.message("leg \(error)", code: 1)
        }
        let target = LinearTarget(device: device, client: client)
        let server = NBDServer(
            exports: [Export(name: export, description: description, readOnly: readOnly, target: target)],
            ringPerLoop: client.engineKind == .ioUring, logger: logger)

        var addresses: [ListenAddress] = []
        if let tcp {
            addresses.append(.tcp(host: tcp.host, port: tcp.port))
        }
        if socket != nil || addresses.isEmpty {
            let path = socket ?? defaultSocketPath
            try claimSocketPath(path)
            addresses.append(.unix(path: path))
        }
        for address in addresses {
            do {
                let bound = try await server.listen(on: address)
                logger.info("serving \(leg) (\(device.size) bytes, engine \(client.engineKind)) on \(bound)")
            } catch {
                throw CleanExit.message("cannot listen on \(address): \(error)", code: 1)
            }
        }

        let signal = await waitForStopSignal()
        logger.info("\(signal): finishing requests in flight")
        await server.shutdown()
        let flushed = try? client.sync(.flush, regions: [IORegion(device: device, sector: 0, count: 0)])
        if let flushed, !flushed.succeeded { logger.error("final flush failed: \(flushed)") }
        for case .unix(let path) in addresses { unlink(path) }
        logger.info("stopped")
    }
}

/// An exit with a message for the person who ran the command.
enum CleanExit: Error, CustomStringConvertible {
    case message(String, code: Int32)
    var description: String {
        switch self { case .message(let text, _): text }
    }
}

extension IOEngineKind: ExpressibleByArgument {}
extension ByteSize: ExpressibleByArgument {}
extension TCPAddress: ExpressibleByArgument {}
