import ArgumentParser
import DMIO
import Glibc

struct DMIOBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dmio-bench",
        abstract: "DMIO's async submit path against fio --ioengine=io_uring, on the same files in the same run.",
        discussion: """
            Writes two backing files in full, then runs each workload on DMIO (the queue \
            kept full from completion callbacks) and on fio, and prints a markdown table: \
            throughput of both, their ratio, CPU seconds per GiB of both, and DMIO's \
            mallocs per request in steady state. Needs \(MallocCounter.libraryName) next to \
            the executable (the build puts it there); the benchmark preloads it itself.
            """)

    @Option(help: "DMIO's I/O engine.")
    var engine: IOEngineKind = .ioUring

    @Option(help: "Size of each backing file, in bytes or with a K, M or G suffix.")
    var size = ByteCount(bytes: gibibyte)

    @Option(help: "Seconds each workload runs, on each side.")
    var runtime = 10

    @Flag(help: "Run each workload for 2 s instead of --runtime.")
    var quick = false

    @Option(name: .customLong("repeat"), help: "Runs of every workload; the table shows medians.")
    var repeats = 1

    @Flag(help: "Bypass the page cache: DMIO opens the files with O_DIRECT, fio gets --direct=1.")
    var direct = false

    @Option(name: .customLong("dir"), help: "Directory for the backing files.")
    var directory = "/dev/shm"

    @Option(name: .customLong("fio"), help: "The fio executable.")
    var fioExecutable = "fio"

    func validate() throws {
        guard runtime >= 1 else { throw ValidationError("--runtime must be at least 1 second") }
        guard repeats >= 1 else { throw ValidationError("--repeat must be at least 1") }
        // Whole mebibytes, so that every 1 MiB and 4 KiB block fits; enough of
        // them that the sequential queue never wraps onto its own requests.
        guard size.bytes >= 16 * mebibyte, size.bytes % mebibyte == 0 else {
            throw ValidationError("--size must be a whole number of MiB, at least 16M")
        }
    }

    func run() throws {
        let fio = try Fio(executable: fioExecutable)
        let client = try DMIOClient(engine: .only(engine))
        let files = try BackingFiles(directory: directory, size: size.bytes)
        defer { files.remove() }
        let devices = try files.paths.map { try BlockDevice.open($0, options: DeviceOptions(direct: direct)) }
        let seconds = quick ? 2 : runtime

        var rows = Workload.all.map { Row(workload: $0) }
        for round in 1...repeats {
            for index in rows.indices {
                let workload = rows[index].workload
                let dmio = try measureDMIO(workload, client: client, devices: devices, seconds: seconds)
                let fioSample = try fio.measure(workload, files: files.paths, fileSize: files.size,
                                                seconds: seconds, direct: direct)
                rows[index].dmio.append(dmio)
                rows[index].fio.append(fioSample)
                log("[\(round)/\(repeats)] " + Report.progressLine(workload, dmio: dmio, fio: fioSample))
            }
        }
        let settings = Report.Settings(engine: engine, fileSize: size.bytes, directory: directory, direct: direct,
                                       seconds: seconds, repeats: repeats, fioVersion: fio.version)
        print(Report(settings: settings, rows: rows).markdown)
    }

    private func log(_ line: String) {
        fputs(line + "\n", stderr)
    }
}

extension IOEngineKind: ExpressibleByArgument {}

/// A size argument: `1073741824`, `512M`, `1G`.
struct ByteCount: ExpressibleByArgument {
    let bytes: Int

    init(bytes: Int) {
        self.bytes = bytes
    }

    init?(argument: String) {
        let multipliers: [Character: Int] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30]
        var digits = Substring(argument)
        var multiplier = 1
        if let last = digits.last?.uppercased().first, let unit = multipliers[last] {
            multiplier = unit
            digits = digits.dropLast()
        }
        guard let count = Int(digits), count >= 0 else { return nil }
        bytes = count * multiplier
    }

    var defaultValueDescription: String {
        bytes % gibibyte == 0 ? "\(bytes / gibibyte)G" : "\(bytes)"
    }
}

/// A failure the benchmark explains and exits on.
struct BenchError: Error, CustomStringConvertible {
    let description: String

    init(_ description: String) {
        self.description = description
    }
}
