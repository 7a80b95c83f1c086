import Glibc

/// Whether the calling thread has plugged its I/O (the kernel's
/// `blk_start_plug`): a thread-local depth, so that plugs may nest, and the
/// engines that held I/O back meanwhile. Like the kernel's plug it belongs
/// to the thread, not to one client: the outermost unplug hands over what
/// every engine queued, whichever client the thread used.
enum Plug {
    private final class State {
        var depth = 0
        var engines: [IOEngine] = []
    }

    private static let states = ThreadLocal { State() }
    private static var state: State { states.value }

    static var isPlugged: Bool { (states.existing?.depth ?? 0) > 0 }

    static func start() { state.depth += 1 }

    /// Called by an engine that held I/O back for the plug: the outermost
    /// unplug flushes it.
    static func held(by engine: IOEngine) {
        let state = state
        if !state.engines.contains(where: { $0 === engine }) { state.engines.append(engine) }
    }

    /// Ends a plug; the outermost end hands every held batch to its engine.
    static func finish() {
        let state = state
        precondition(state.depth > 0, "unplug without plug")
        state.depth -= 1
        guard state.depth == 0 else { return }
        while let engine = state.engines.popLast() { engine.flushPlugged() }
    }
}
