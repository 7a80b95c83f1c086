import DMIO
import Foundation

/// Every sample of one workload, one per repeat.
struct Row {
    let workload: Workload
    var dmio: [DMIOSample] = []
    var fio: [FioSample] = []
}

/// The markdown the benchmark prints: a header line, the table, and what
/// the columns count.
struct Report {
    struct Settings {
        let engine: IOEngineKind
        let fileSize: Int
        let directory: String
        let direct: Bool
        let seconds: Int
        let repeats: Int
        let fioVersion: String
    }

    let settings: Settings
    let rows: [Row]

    var markdown: String {
        let header = "| workload | DMIO | fio | DMIO/fio | DMIO CPU s/GiB | fio CPU s/GiB | mallocs per I/O |"
        let alignment = "|---|---:|---:|---:|---:|---:|---:|"
        return ([headerLine, "", header, alignment] + rows.map(tableLine) + ["", notes]).joined(separator: "\n")
    }

    /// One run of one workload, for the log while the benchmark runs.
    static func progressLine(_ workload: Workload, dmio: DMIOSample, fio: FioSample) -> String {
        let metric = workload.metric
        return "\(workload.label): DMIO \(format(dmio.throughput.value(metric), metric)) \(workload.unit), "
            + "\(format(dmio.throughput.cpuSecondsPerGiB)) CPU s/GiB, "
            + "\(dmio.mallocs) mallocs in \(dmio.requests) requests; "
            + "fio \(format(fio.throughput.value(metric), metric)), "
            + "\(format(fio.throughput.cpuSecondsPerGiB)) CPU s/GiB (job threads \(format(fio.jobCPUSecondsPerGiB)))"
    }

    private var headerLine: String {
        let cache = settings.direct ? "O_DIRECT (fio --direct=1)" : "page cache (fio --direct=0)"
        let repeats = settings.repeats == 1 ? "1 run" : "median of \(settings.repeats) runs"
        return "DMIO engine **\(settings.engine)** vs fio --ioengine=io_uring · "
            + "2 files of \(settings.fileSize / mebibyte) MiB in \(settings.directory), \(cache) · "
            + "\(settings.seconds) s per workload and side, \(repeats) · "
            + "kernel \(kernelRelease()) · \(settings.fioVersion) · \(machine()) · \(today())"
    }

    private func tableLine(_ row: Row) -> String {
        let metric = row.workload.metric
        let dmio = median(row.dmio.map { $0.throughput.value(metric) })
        let fio = median(row.fio.map { $0.throughput.value(metric) })
        let cells = [
            "\(row.workload.label) (\(row.workload.unit))",
            Self.format(dmio, metric),
            Self.format(fio, metric),
            String(format: "%.2fx", dmio / fio),
            Self.format(median(row.dmio.map(\.throughput.cpuSecondsPerGiB))),
            Self.format(median(row.fio.map(\.throughput.cpuSecondsPerGiB)))
                + " [\(Self.format(median(row.fio.map(\.jobCPUSecondsPerGiB))))]",
            Self.formatMallocs(median(row.dmio.map(\.mallocsPerRequest))),
        ]
        return "| " + cells.joined(separator: " | ") + " |"
    }

    private var notes: String {
        """
        - 2-region rows: each DMIO request is one `submit` writing the same buffer to both files; \
        fio runs one job per file at once. Both count a 2-region write once ("mirrored" = leg writes / 2), \
        in requests and in GiB.
        - DMIO: the queue is kept full from completion callbacks; measured for the run time after a \
        \(warmUpSeconds) s warm-up. CPU is getrusage(RUSAGE_SELF) over that window: every thread, \
        io_uring's kernel workers included.
        - fio CPU: the whole fio process tree (getrusage(RUSAGE_CHILDREN) around the run), io_uring \
        workers and fio start-up included. [In brackets]: fio's JSON usr_cpu + sys_cpu, which counts \
        the job threads only.
        - mallocs per I/O: mallocs of every thread of the benchmark process during DMIO's window \
        (MallocInterposerSwift), divided by the requests completed in it.
        """
    }

    static func format(_ value: Double, _ metric: Workload.Metric) -> String {
        switch metric {
        case .iops: String(format: "%.1fk", value / 1000)
        case .mibPerSecond: String(format: "%.0f", value)
        }
    }

    static func format(_ seconds: Double) -> String {
        String(format: "%.2f", seconds)
    }

    /// Shows a true zero as "0", and anything above it with enough digits
    /// to tell one malloc in a thousand requests from none.
    static func formatMallocs(_ perRequest: Double) -> String {
        perRequest == 0 ? "0" : String(format: "%.4g", perRequest)
    }

    private func kernelRelease() -> String {
        let release = try? String(contentsOfFile: "/proc/sys/kernel/osrelease", encoding: .utf8)
        return release?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "unknown"
    }

    private func machine() -> String {
        let cpuInfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        let model = cpuInfo.split(separator: "\n").first { $0.hasPrefix("model name") }?
            .split(separator: ":", maxSplits: 1).last?.trimmingCharacters(in: .whitespaces)
        return "\(ProcessInfo.processInfo.activeProcessorCount) CPUs" + (model.map { " (\($0))" } ?? "")
    }

    private func today() -> String {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "UTC")
        formatter.dateFormat = "yyyy-MM-dd HH:mm 'UTC'"
        return formatter.string(from: Date())
    }
}
