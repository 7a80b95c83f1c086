import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// The HTTP endpoint Prometheus scrapes: `GET /metrics` answers the
/// exporter's text, made at the request. One thread of its own, so that a
/// scrape never waits behind NBD requests nor they behind it.
public final class MetricsServer: Sendable {
    private let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    private let exporter: MetricsExporter
    private let channel: NIOLockedValueBox<Channel?>

    public init(exporter: MetricsExporter) {
        self.exporter = exporter
        channel = NIOLockedValueBox(nil)
    }

    /// Serves on a socket already bound and listening (TCP or unix), which
    /// the server then owns.
    public func serve(listening socket: Int32) async throws {
        let bound = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 16)
            .childChannelInitializer { [exporter] channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(MetricsHTTPHandler(exporter: exporter))
                }
            }
            .withBoundSocket(socket).get()
        channel.withLockedValue { $0 = bound }
    }

    public func shutdown() async {
        try? await channel.withLockedValue({ $0 })?.close()
        try? await group.shutdownGracefully()
    }
}

/// Answers one HTTP connection's requests: the metrics at /metrics, a
/// pointer to them at /, 404 elsewhere, 405 for anything but GET and HEAD.
final class MetricsHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let exporter: MetricsExporter
    private var request: HTTPRequestHead?

    init(exporter: MetricsExporter) {
        self.exporter = exporter
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): request = head
        case .body: break
        case .end:
            guard let request else { return }
            self.request = nil
            respond(to: request, context: context)
        }
    }

    private func respond(to request: HTTPRequestHead, context: ChannelHandlerContext) {
        let path = request.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? request.uri
        let (status, type, body): (HTTPResponseStatus, String, [UInt8])
        switch (request.method, path) {
        case (.GET, "/metrics"), (.HEAD, "/metrics"):
            (status, type, body) = (.ok, MetricsExporter.contentType, exporter.render())
        case (.GET, "/"), (.HEAD, "/"):
            (status, type, body) = (.ok, "text/plain; charset=utf-8", Array("dmio-nbd: the metrics are at /metrics\n".utf8))
        case (.GET, _), (.HEAD, _):
            (status, type, body) = (.notFound, "text/plain; charset=utf-8", Array("not found: the metrics are at /metrics\n".utf8))
        default:
            (status, type, body) = (.methodNotAllowed, "text/plain; charset=utf-8", Array("only GET and HEAD\n".utf8))
        }
        var headers = HTTPHeaders([("Content-Type", type), ("Content-Length", "\(body.count)")])
        if status == .methodNotAllowed { headers.add(name: "Allow", value: "GET, HEAD") }
        let keepAlive = request.isKeepAlive
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: status, headers: headers))),
                      promise: nil)
        if request.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        }
        let sent = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive { sent.whenComplete { [channel = context.channel] _ in channel.close(promise: nil) } }
    }
}
