import Glibc

let mebibyte = 1 << 20
let gibibyte = 1 << 30

/// What one side did in one timed window. A 2-region write counts once, in
/// requests and in bytes, on both sides ("mirrored").
struct Throughput {
    var requestsPerSecond: Double
    var bytesPerSecond: Double
    var cpuSecondsPerGiB: Double

    init(requests: Double, bytes: Double, seconds: Double, cpuSeconds: Double) {
        requestsPerSecond = requests / seconds
        bytesPerSecond = bytes / seconds
        cpuSecondsPerGiB = bytes > 0 ? cpuSeconds / (bytes / Double(gibibyte)) : .infinity
    }

    /// The figure the table shows for `metric`.
    func value(_ metric: Workload.Metric) -> Double {
        switch metric {
        case .iops: requestsPerSecond
        case .mibPerSecond: bytesPerSecond / Double(mebibyte)
        }
    }
}

/// CPU time (user + system) of this process, all threads, in seconds.
func processCPUSeconds() -> Double {
    cpuSeconds(RUSAGE_SELF.rawValue)
}

/// CPU time of the children this process has waited for, and of theirs.
func childrenCPUSeconds() -> Double {
    cpuSeconds(RUSAGE_CHILDREN.rawValue)
}

private func cpuSeconds(_ who: Int32) -> Double {
    var usage = rusage()
    getrusage(who, &usage)
    return seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

private func seconds(_ time: timeval) -> Double {
    Double(time.tv_sec) + Double(time.tv_usec) / 1e6
}

func monotonicSeconds() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
}

/// Sleeps without allocating, so that it can sit inside a counted window.
func sleep(seconds: Double) {
    let whole = seconds.rounded(.down)
    var request = timespec(tv_sec: Int(whole), tv_nsec: Int((seconds - whole) * 1e9))
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR {
        request = remaining
    }
}

func median(_ values: [Double]) -> Double {
    let sorted = values.sorted()
    let middle = sorted.count / 2
    return sorted.count % 2 == 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
}
