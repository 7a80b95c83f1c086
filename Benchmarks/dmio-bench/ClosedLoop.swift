import Dispatch
import DMIO
import Glibc
import Synchronization

/// Keeps `queueDepth` requests of one workload in flight on a DMIO client
/// with the async `submit`: each completion submits its slot's next request
/// from inside the completion callback, on the thread that ran it, so no
/// thread hop sits between one request and the next.
///
/// Everything a request needs is made up front, one slot per request in
/// flight: a page-aligned buffer, the regions array, a random generator. In
/// steady state the loop itself allocates nothing, so the mallocs counted
/// while it runs are DMIO's.
final class ClosedLoop {
    private final class Slot {
        /// Changed in place for each request; see `keepBusy` for why that
        /// never copies it.
        var regions: [IORegion]
        let buffer: UnsafeMutableRawBufferPointer
        var random: Xorshift
        let state = Atomic<SlotState>(.inFlight)

        init(regions: [IORegion], bufferSize: Int, seed: UInt64) {
            self.regions = regions
            buffer = allocateAligned(bufferSize)
            // Written once so that no page fault lands in a timed window.
            memset(buffer.baseAddress!, 0xA5, bufferSize)
            random = Xorshift(seed: seed)
        }

        deinit { free(buffer.baseAddress) }
    }

    private enum SlotState: UInt8, AtomicRepresentable {
        /// Inside `submit`, which still holds the regions array.
        case submitting
        /// Submitted; its completion submits the next request.
        case inFlight
        /// Completed before its `submit` returned; the submitter goes on.
        case completedEarly
    }

    private let client: DMIOClient
    private let workload: Workload
    private let blocksPerDevice: UInt64
    private let sectorsPerBlock: UInt64
    private var slots: [Slot] = []
    private let sequentialBlock = Atomic<UInt64>(0)
    private let completions = Atomic<Int>(0)
    private let inFlight = Atomic<Int>(0)
    private let stopping = Atomic<Bool>(false)
    private let drained = DispatchSemaphore(value: 0)
    private let firstFailure = Mutex<String?>(nil)
    /// Made once: handing a stored closure to `submit` allocates nothing,
    /// where a closure literal capturing the slot would allocate a context
    /// on every request.
    private var onCompletion: IONotify!

    /// `devices` gives each request's regions, one per leg of the workload.
    init(client: DMIOClient, workload: Workload, devices: [BlockDevice]) {
        self.client = client
        self.workload = workload
        let legs = Array(devices.prefix(workload.legs))
        blocksPerDevice = legs.map(\.size).min()! / UInt64(workload.blockSize)
        sectorsPerBlock = UInt64(workload.blockSize / sectorSize)
        let seedBase = UInt64(bitPattern: Int64(monotonicSeconds() * 1e9))
        slots = (0..<workload.queueDepth).map { index in
            Slot(regions: legs.map { IORegion(device: $0, sector: 0, count: sectorsPerBlock) },
                 bufferSize: workload.blockSize,
                 seed: seedBase ^ (UInt64(index + 1) &* 0x9E37_79B9_7F4A_7C15))
        }
        onCompletion = { [unowned self] result, context in
            completed(result, slot: unsafeDowncast(context!, to: Slot.self))
        }
    }

    /// Requests completed so far.
    var completedRequests: Int { completions.load(ordering: .relaxed) }

    /// Fills every slot; from then on completions keep the queue full.
    func start() {
        inFlight.store(slots.count, ordering: .relaxed)
        for slot in slots { keepBusy(slot) }
    }

    /// Lets the requests in flight finish without replacing them, waits for
    /// the last, and throws if any request failed.
    func stop() throws {
        stopping.store(true, ordering: .relaxed)
        drained.wait()
        if let failure = firstFailure.withLock({ $0 }) {
            throw BenchError("DMIO \(workload.label): \(failure)")
        }
    }

    /// Submits the slot's next request, and goes on submitting for as long
    /// as each completes before its `submit` returns. DMIO calls a
    /// completion from inside `submit` when the I/O beat the dispatcher's
    /// last count, or on an engine thread while the submitter is still
    /// returning; that completion leaves the next request to this loop
    /// rather than recursing, and rather than changing the regions array
    /// while `submit` still holds it (which would copy it: a malloc).
    private func keepBusy(_ slot: Slot) {
        while !stopping.load(ordering: .relaxed) {
            slot.state.store(.submitting, ordering: .relaxed)
            guard submitNext(slot) else { break }
            if slot.state.compareExchange(expected: .submitting, desired: .inFlight,
                                          ordering: .acquiringAndReleasing).exchanged {
                return
            }
        }
        retire()
    }

    /// Not inlined, so that the reference to the regions array passed to
    /// `submit` is dropped before `keepBusy` publishes the slot's state.
    @inline(never)
    private func submitNext(_ slot: Slot) -> Bool {
        let sector = nextBlock(slot) * sectorsPerBlock
        for index in slot.regions.indices { slot.regions[index].sector = sector }
        do {
            try client.submit(workload.operation, regions: slot.regions, memory: .buffer(slot.buffer),
                              context: slot, notify: onCompletion)
            return true
        } catch {
            fail("submit refused: \(error)")
            return false
        }
    }

    private func completed(_ result: IOResult, slot: Slot) {
        if result.succeeded {
            completions.wrappingAdd(1, ordering: .relaxed)
        } else {
            fail("\(workload.operation) failed: \(result)")
        }
        let submitterStillInside = slot.state.compareExchange(
            expected: .submitting, desired: .completedEarly, ordering: .acquiringAndReleasing).exchanged
        if !submitterStillInside { keepBusy(slot) }
    }

    private func nextBlock(_ slot: Slot) -> UInt64 {
        switch workload.pattern {
        case .random: slot.random.next() % blocksPerDevice
        case .sequential: sequentialBlock.wrappingAdd(1, ordering: .relaxed).oldValue % blocksPerDevice
        }
    }

    private func fail(_ message: String) {
        firstFailure.withLock { failure in
            if failure == nil { failure = message }
        }
        stopping.store(true, ordering: .relaxed)
    }

    /// A slot leaves the loop; the last one wakes `stop()`.
    private func retire() {
        if inFlight.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 {
            drained.signal()
        }
    }
}

/// Marsaglia's xorshift64: a few instructions per number, random enough to
/// spread offsets over a file.
struct Xorshift {
    private var state: UInt64

    init(seed: UInt64) {
        state = seed == 0 ? 0x2545_F491_4F6C_DD1D : seed
    }

    mutating func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }
}
