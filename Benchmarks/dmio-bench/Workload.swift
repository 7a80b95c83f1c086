import DMIO

/// One row of the table: what DMIO and fio both do for `--runtime` seconds.
struct Workload {
    enum Pattern {
        case random
        case sequential
    }

    enum Metric {
        case iops
        case mibPerSecond
    }

    let label: String
    let operation: IOOperation
    let pattern: Pattern
    let blockSize: Int
    let queueDepth: Int
    /// Regions per DMIO request, and fio jobs run side by side (one per file).
    let legs: Int
    let metric: Metric

    static let all = [
        Workload(label: "4k randread QD32", operation: .read, pattern: .random,
                 blockSize: 4 << 10, queueDepth: 32, legs: 1, metric: .iops),
        Workload(label: "4k randwrite QD32, 2 regions", operation: .write, pattern: .random,
                 blockSize: 4 << 10, queueDepth: 32, legs: 2, metric: .iops),
        Workload(label: "1M seq read QD8", operation: .read, pattern: .sequential,
                 blockSize: 1 << 20, queueDepth: 8, legs: 1, metric: .mibPerSecond),
        Workload(label: "1M seq write QD8, 2 regions", operation: .write, pattern: .sequential,
                 blockSize: 1 << 20, queueDepth: 8, legs: 2, metric: .mibPerSecond),
    ]

    /// fio's `--rw` for this workload.
    var fioMode: String {
        switch (pattern, operation) {
        case (.random, .read): "randread"
        case (.random, _): "randwrite"
        case (.sequential, .read): "read"
        case (.sequential, _): "write"
        }
    }

    var unit: String {
        switch metric {
        case .iops: legs > 1 ? "mirrored IOPS" : "IOPS"
        case .mibPerSecond: legs > 1 ? "mirrored MiB/s" : "MiB/s"
        }
    }
}
