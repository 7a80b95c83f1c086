import DMIO
import Foundation

/// One timed window of one workload on DMIO.
struct DMIOSample {
    let throughput: Throughput
    let requests: Int
    let mallocs: Int

    var mallocsPerRequest: Double { Double(mallocs) / Double(max(requests, 1)) }
}

/// Runs `workload` on `client` for a warm-up, then measures `seconds` of
/// steady state: requests, CPU time of the whole process (every engine
/// thread, and io_uring's kernel workers, which count as our threads) and
/// mallocs of every thread.
func measureDMIO(_ workload: Workload, client: DMIOClient, devices: [BlockDevice],
                 seconds: Int) throws -> DMIOSample {
    let loop = ClosedLoop(client: client, workload: workload, devices: devices)
    // On a thread of its own: I/O to files in memory completes inside
    // `submit`, so the loop may keep its thread until it is stopped.
    let starter = Thread { loop.start() }
    starter.start()
    // Pools in DMIO and the kernel fill up, buffers and files are touched.
    sleep(seconds: warmUpSeconds)
    let (window, mallocs) = MallocCounter.counting {
        let start = Reading(loop)
        sleep(seconds: Double(seconds))
        return (start: start, end: Reading(loop))
    }
    try loop.stop()

    let requests = window.end.requests - window.start.requests
    let throughput = Throughput(
        requests: Double(requests),
        bytes: Double(requests) * Double(workload.blockSize),
        seconds: window.end.time - window.start.time,
        cpuSeconds: window.end.cpuSeconds - window.start.cpuSeconds)
    return DMIOSample(throughput: throughput, requests: requests, mallocs: mallocs)
}

let warmUpSeconds = 0.5

/// The counters a window is measured between; reading them allocates nothing.
private struct Reading {
    let time: Double
    let cpuSeconds: Double
    let requests: Int

    init(_ loop: ClosedLoop) {
        time = monotonicSeconds()
        cpuSeconds = processCPUSeconds()
        requests = loop.completedRequests
    }
}
