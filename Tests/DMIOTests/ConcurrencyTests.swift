import DMIO
import Foundation
import Testing

/// Many asynchronous requests in flight from several threads at once.
@Suite struct ConcurrencyTests {
    @Test(arguments: engines)
    func manyRequestsFromManyThreadsEachCompleteOnceWithTheirData(engine: IOEngineKind) throws {
        let folder = TemporaryFolder()
        let client = try client(engine)
        let a = try folder.device("a", size: 16 << 20)
        let b = try folder.device("b", size: 16 << 20)
        let threads = 4
        let perThread = 400
        let blockSize = 4096
        let counter = CompletionCounter()
        // Every request writes its own block, so the data can be checked after.
        let buffers = (0..<threads * perThread).map { AlignedBuffer(count: blockSize, pattern: UInt8(truncatingIfNeeded: $0)) }

        DispatchQueue.concurrentPerform(iterations: threads) { thread in
            for index in 0..<perThread {
                let block = thread * perThread + index
                let sector = UInt64(block * blockSize / sectorSize)
                let regions = [IORegion(device: a, sector: sector, count: 8), IORegion(device: b, sector: sector, count: 8)]
                do {
                    try client.submit(.write, regions: regions, buffer: buffers[block].bytes) { result, _ in
                        counter.record(result)
                    }
                } catch {
                    Issue.record("submit: \(error)")
                }
            }
        }
        let results = counter.waitFor(threads * perThread)
        #expect(results.count == threads * perThread)
        #expect(results.allSatisfy { $0 == .success })
        usleep(10_000)
        #expect(counter.waitFor(0).count == threads * perThread, "no request completes twice")

        let wholeA = fileBytes(a.name, count: threads * perThread * blockSize)
        let wholeB = fileBytes(b.name, count: threads * perThread * blockSize)
        for (block, buffer) in buffers.enumerated() {
            let range = block * blockSize..<(block + 1) * blockSize
            #expect(Array(wholeA[range]) == buffer.array, "block \(block) on a")
            #expect(Array(wholeB[range]) == buffer.array, "block \(block) on b")
        }
    }

    /// A completion that submits the next request, as a queue-depth loop
    /// does, must not deadlock the engine's completion thread.
    @Test(arguments: engines)
    func completionsMaySubmitMoreRequests(engine: IOEngineKind) throws {
        let folder = TemporaryFolder()
        let client = try client(engine)
        let device = try BlockDevice.open(folder.file("disk", size: 8 << 20))
        let buffer = AlignedBuffer(count: 4096, pattern: 1)
        let done = CompletionCounter()
        let chains = 32
        let length = 200

        final class Chain: @unchecked Sendable {
            var remaining: Int
            init(_ remaining: Int) { self.remaining = remaining }
        }
        func next(_ chain: Chain, _ index: Int) {
            chain.remaining -= 1
            let region = IORegion(device: device, sector: UInt64(index * 8), count: 8)
            do {
                try client.submit(.write, regions: [region], buffer: buffer.bytes, context: chain) { result, context in
                    let chain = context as! Chain
                    if result != .success || chain.remaining == 0 { done.record(result) } else { next(chain, index) }
                }
            } catch {
                Issue.record("submit: \(error)")
            }
        }
        for index in 0..<chains { next(Chain(length), index) }
        let results = done.waitFor(chains)
        #expect(results.count == chains)
        #expect(results.allSatisfy { $0 == .success })
    }

    /// Writes to a file in memory complete on the submitting thread, inside
    /// `submit`: a chain of them must run in a loop, not nest on the stack.
    @Test(arguments: engines)
    func aLongChainOfWritesToMemoryCompletesWithoutNesting(engine: IOEngineKind) throws {
        let folder = TemporaryFolder(in: "/dev/shm")
        let client = try client(engine)
        let device = try folder.device("disk", size: 1 << 20)
        let buffer = AlignedBuffer(count: 4096, pattern: 3)
        let done = CompletionCounter()
        let links = 100_000

        final class Chain: @unchecked Sendable {
            var written = 0
        }
        func write(_ chain: Chain) {
            let region = IORegion(device: device, sector: UInt64(chain.written % 256 * 8), count: 8)
            do {
                try client.submit(.write, regions: [region], buffer: buffer.bytes, context: chain) { result, context in
                    let chain = context as! Chain
                    chain.written += 1
                    if result != .success || chain.written == links { done.record(result) } else { write(chain) }
                }
            } catch {
                Issue.record("submit: \(error)")
            }
        }
        let chain = Chain()
        write(chain)
        #expect(done.waitFor(1) == [.success])
        #expect(chain.written == links)
        #expect(fileBytes(device.name, offset: 255 * 4096, count: 4096) == buffer.array)
    }
}

/// A plug holds a thread's I/O back until it unplugs (blk_start_plug).
@Suite struct PlugTests {
    @Test func pluggedIOWaitsForUnplugThenCompletes() throws {
        let folder = TemporaryFolder()
        let client = try client(.ioUring)
        let device = try folder.device("disk", size: 1 << 20)
        let data = AlignedBuffer(count: 4096, pattern: 3)
        let done = CompletionCounter()
        client.plug()
        client.plug()
        for index in 0..<4 {
            try client.submit(.write, regions: [IORegion(device: device, sector: UInt64(index * 8), count: 8)],
                              buffer: data.bytes) { result, _ in done.record(result) }
        }
        client.unplug()
        usleep(100_000)
        #expect(done.waitFor(0).isEmpty, "nothing reaches the kernel while a plug is held")
        client.unplug()
        #expect(done.waitFor(4).count == 4)
        #expect(done.waitFor(4).allSatisfy { $0 == .success })
        #expect(fileBytes(device.name, offset: 3 * 4096, count: 4096) == data.array)
    }

    /// The plug is the thread's, as in the kernel: I/O the thread sends
    /// through another client while plugged goes out at the unplug too.
    @Test func anUnplugHandsOverWhatEveryClientHeldBack() throws {
        let folder = TemporaryFolder()
        let plugged = try client(.ioUring)
        let other = try client(.ioUring)
        let device = try folder.device("disk", size: 1 << 20)
        let data = AlignedBuffer(count: 4096, pattern: 4)
        let done = CompletionCounter()
        plugged.plug()
        try other.submit(.write, regions: [IORegion(device: device, sector: 0, count: 8)],
                         buffer: data.bytes) { result, _ in done.record(result) }
        plugged.unplug()
        #expect(done.waitFor(1) == [.success])
        let landed = fileBytes(device.name, count: 4096) == data.array
        #expect(landed)
    }
}

/// A client driven by its own thread, as an event loop drives it. Each test
/// runs on a thread of its own: the thread keeps its client until it exits.
@Suite struct ThreadDrivenTests {
    private func onOwnThread(_ body: @escaping () throws -> Void) throws {
        let done = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var failure: Error?
        let thread = Thread {
            do { try body() } catch { failure = error }
            done.signal()
        }
        thread.start()
        done.wait()
        if let failure { throw failure }
    }

    @Test func syncAndAsyncRequestsCompleteOnTheOwningThread() throws {
        try onOwnThread(Self.syncAndAsync)
    }

    @Test func writesHandedToKernelWorkersComeBackThroughTheEventFD() throws {
        try onOwnThread(Self.workerWrites)
    }

    @Test(arguments: [false, true])
    func largeWritesToMemoryLeaveTheSubmitterOnlyWhenOffloaded(offload: Bool) throws {
        try onOwnThread { try Self.largeMemoryWrite(offload: offload) }
    }

    /// Reaps the thread-driven client's completions as its eventfd
    /// announces them, until `done` (at most 10 s).
    private static func reap(_ client: DMIOClient, until done: () -> Bool) throws {
        let eventFD = try #require(client.completionEventFD)
        let deadline = Date().addingTimeInterval(10)
        while !done() && Date() < deadline {
            var descriptor = pollfd(fd: eventFD, events: Int16(POLLIN), revents: 0)
            if poll(&descriptor, 1, 100) == 1 {
                var counter: UInt64 = 0
                _ = read(eventFD, &counter, 8)
            }
            client.reapCompletions()
        }
    }

    private static func syncAndAsync() throws {
        let folder = TemporaryFolder()
        let device = try folder.device("disk", size: 4 << 20)
        let client = try DMIOClient.threadDriven(pages: 8)
        let data = AlignedBuffer(count: 64 << 10, pattern: 21)
        let region = IORegion(device: device, sector: 64, count: 128)
        #expect(try client.sync(.write, regions: [region], buffer: data.bytes, flags: .fua) == .success)

        let owner = pthread_self()
        var results: [IOResult] = []
        let backs = (0..<16).map { _ in AlignedBuffer(count: 64 << 10) }
        for back in backs {
            try client.submit(.read, regions: [region], buffer: back.bytes) { result, _ in
                #expect(pthread_equal(pthread_self(), owner) != 0, "completions run on the owning thread")
                results.append(result)
            }
        }
        // Reads of the page cache complete while being submitted; whatever
        // is left is announced by the eventfd.
        try reap(client) { results.count == backs.count }
        #expect(results.count == backs.count)
        #expect(results.allSatisfy { $0 == .success })
        #expect(backs.allSatisfy { $0.array == data.array })
    }

    private static func workerWrites() throws {
        // ext4 cannot start a buffered write without blocking: io_uring runs
        // these writes in its workers, and their completions wait for the
        // owning thread.
        let folder = TemporaryFolder(in: "/tmp")
        let device = try folder.device("disk", size: 4 << 20)
        let client = try DMIOClient.threadDriven()
        let data = AlignedBuffer(count: 4096, pattern: 5)
        var completed = 0
        for index in 0..<64 {
            try client.submit(.write, regions: [IORegion(device: device, sector: UInt64(index * 8), count: 8)],
                              buffer: data.bytes) { result, _ in
                #expect(result == .success)
                completed += 1
            }
        }
        try reap(client) { completed == 64 }
        #expect(completed == 64)
        #expect(fileBytes(device.name, offset: 63 * 4096, count: 4096) == data.array)
    }

    private static func largeMemoryWrite(offload: Bool) throws {
        let folder = TemporaryFolder(in: "/dev/shm")
        let device = try folder.device("leg", size: 4 << 20)
        let client = try DMIOClient.threadDriven()
        client.offloadsLargeMemoryWrites = offload
        let data = AlignedBuffer(count: 1 << 20, pattern: 9)
        var completed = false
        try client.submit(.write, regions: [IORegion(device: device, sector: 2048, count: 2048)],
                          buffer: data.bytes) { result, _ in
            #expect(result == .success)
            completed = true
        }
        // The submitter copies before `submit` returns; an offloaded write is
        // copied by a kernel worker, and its completion waits for the owner.
        #expect(completed == !offload)
        try reap(client) { completed }
        #expect(completed)
        #expect(fileBytes(device.name, offset: 1 << 20, count: 1 << 20) == data.array)
    }
}
