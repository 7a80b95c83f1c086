import BlockTargets
import DMIO
import Glibc
import NIOCore
import NIOPosix

/// Gives every event loop of a group its own thread-driven DMIO client,
/// which the loop's connections pass to their target (`IOContext`), and
/// watches the client's eventfd with a pipe channel on the same loop, so
/// that storage completions are reaped by the loop itself: no DMIO thread,
/// no hop.
struct EventLoopIO {
    let loop: EventLoop
    let client: DMIOClient
    /// Watches the client's eventfd; closing it stops the watching.
    let reaper: Channel

    var context: IOContext { IOContext(loopClient: client) }

    /// One per loop of `group`, by the loop's identity.
    static func attach(to group: EventLoopGroup) async throws -> [ObjectIdentifier: EventLoopIO] {
        var attached: [ObjectIdentifier: EventLoopIO] = [:]
        for loop in group.makeIterator() {
            // Made on its loop: the ring belongs to the thread that makes it.
            let client = try await loop.submit { try DMIOClient.threadDriven() }.get()
            // The channel owns (and closes) what it is given: a duplicate.
            let eventFD = dup(client.completionEventFD!)
            let reaper = try await NIOPipeBootstrap(group: loop)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(CompletionReaper(client: client))
                    }
                }
                .takingOwnershipOfDescriptor(input: eventFD)
                .get()
            attached[ObjectIdentifier(loop)] = EventLoopIO(loop: loop, client: client, reaper: reaper)
        }
        return attached
    }
}

/// Reaps the loop's DMIO completions whenever its eventfd is signalled.
private final class CompletionReaper: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let client: DMIOClient

    init(client: DMIOClient) {
        self.client = client
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        client.reapCompletions()
    }
}
