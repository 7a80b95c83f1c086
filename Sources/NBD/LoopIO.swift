import DMIO
import Glibc
import NIOCore
import NIOPosix

/// Gives every event loop of a group its own thread-driven DMIO client
/// (`DMIOClient.current` on that loop), and watches the client's eventfd
/// with a pipe channel on the same loop, so that storage completions are
/// reaped by the loop itself: no DMIO thread, no hop.
enum EventLoopIO {
    /// Returns the eventfd channels; closing them stops the watching.
    static func attach(to group: EventLoopGroup) async throws -> [Channel] {
        var channels: [Channel] = []
        for loop in group.makeIterator() {
            let eventFD = try await loop.submit { () throws -> Int32 in
                let client = try DMIOClient.threadDriven()
                // The channel owns (and closes) what it is given: a duplicate.
                return dup(client.completionEventFD!)
            }.get()
            let channel = try await NIOPipeBootstrap(group: loop)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(CompletionReaper())
                    }
                }
                .takingOwnershipOfDescriptor(input: eventFD)
                .get()
            channels.append(channel)
        }
        return channels
    }
}

/// Reaps the loop's DMIO completions whenever its eventfd is signalled.
private final class CompletionReaper: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        DMIOClient.current?.reapCompletions()
    }
}
