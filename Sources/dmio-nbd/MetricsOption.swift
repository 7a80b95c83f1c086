import ArgumentParser
import Logging
import Monitoring
import NBD

/// Where `serve --metrics` listens: `HOST:PORT`, `:PORT` (every address),
/// or `unix:PATH`. No default port: Prometheus exporters each have their own,
/// and none is ours.
enum MetricsAddress: ExpressibleByArgument, CustomStringConvertible {
    case tcp(TCPAddress)
    case unix(String)

    init?(argument text: String) {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst("unix:".count))
            guard !path.isEmpty else { return nil }
            self = .unix(path)
            return
        }
        guard text.contains(":"), let address = TCPAddress(argument: text) else { return nil }
        self = .tcp(address)
    }

    var description: String {
        switch self {
        case .tcp(let address): "\(address.host):\(address.port)"
        case .unix(let path): "unix:\(path)"
        }
    }

    /// Bound and listening now, before any leg is opened: a port in use is
    /// refused before anything is written.
    func bind() throws -> Listener {
        switch self {
        case .tcp(let address): try Listener.tcp(address)
        case .unix(let path): try Listener.unix(absolutePath(path))
        }
    }
}

/// The metrics endpoint of a running server.
struct MetricsEndpoint {
    let server: MetricsServer
    let listener: Listener

    /// Serves `sources` on `listener`, and says where.
    static func start(on listener: Listener, sources: MetricsSources, logger: Logger) async throws -> MetricsEndpoint {
        let server = MetricsServer(exporter: MetricsExporter(sources))
        do {
            try await server.serve(listening: listener.socket)
        } catch {
            await server.shutdown()
            throw CleanExit.message("cannot serve metrics on \(listener.address): \(error)", code: 1)
        }
        switch listener.address {
        case .unix(let path): logger.info("metrics on \(path): curl --unix-socket \(path) http://localhost/metrics")
        case .tcp(let host, let port): logger.info("metrics at http://\(host):\(port)/metrics")
        }
        return MetricsEndpoint(server: server, listener: listener)
    }

    func stop() async {
        await server.shutdown()
        listener.removeFile()
    }
}
