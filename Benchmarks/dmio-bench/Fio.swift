import Foundation

/// One run of one workload on fio.
struct FioSample {
    /// CPU time here is the whole fio process tree's, io_uring workers included.
    let throughput: Throughput
    /// CPU per GiB as fio's JSON reports it (usr_cpu + sys_cpu of the job
    /// threads only, without the io_uring workers that do buffered I/O).
    let jobCPUSecondsPerGiB: Double
}

/// fio with its io_uring engine, on the same files and settings as DMIO.
struct Fio {
    let executable: String
    let version: String

    init(executable: String) throws {
        self.executable = executable
        version = try Self.output(of: [executable, "--version"]).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Runs `workload` for `seconds`. A workload with 2 legs runs one job per
    /// file at once and reports half the total ("mirrored"), as one 2-region
    /// DMIO write is two leg writes.
    func measure(_ workload: Workload, files: [String], fileSize: Int, seconds: Int,
                 direct: Bool) throws -> FioSample {
        var arguments = [
            "--output-format=json",
            "--ioengine=io_uring", "--direct=\(direct ? 1 : 0)",
            "--time_based", "--runtime=\(seconds)", "--norandommap", "--randrepeat=0",
            "--rw=\(workload.fioMode)", "--bs=\(workload.blockSize)", "--iodepth=\(workload.queueDepth)",
            "--size=\(fileSize)", "--group_reporting",
        ]
        for (leg, file) in files.prefix(workload.legs).enumerated() {
            arguments += ["--name=leg\(leg)", "--filename=\(file)"]
        }
        // fio's JSON leaves out the io_uring workers' CPU; the children's
        // rusage of this process has every thread of every fio process.
        let cpuBefore = childrenCPUSeconds()
        let output = try Self.output(of: [executable] + arguments)
        let cpuSeconds = childrenCPUSeconds() - cpuBefore

        let job = try Self.job(fromReport: output, workload: workload)
        let direction = workload.operation == .read ? job.read : job.write
        let legs = Double(workload.legs)
        let bytes = Double(direction.ioBytes) / legs
        let throughput = Throughput(requests: Double(direction.totalIos) / legs, bytes: bytes,
                                    seconds: Double(direction.runtime) / 1000, cpuSeconds: cpuSeconds)
        let jobCPUSeconds = (job.usrCpu + job.sysCpu) / 100 * Double(job.jobRuntime) / 1000
        return FioSample(throughput: throughput, jobCPUSecondsPerGiB: jobCPUSeconds / (bytes / Double(gibibyte)))
    }

    private static func job(fromReport output: String, workload: Workload) throws -> FioReport.Job {
        // fio may print notes before the JSON document on the same stdout.
        guard let start = output.hasPrefix("{") ? output.startIndex : output.range(of: "\n{")?.lowerBound else {
            throw BenchError("fio \(workload.label): no JSON report in its output:\n\(output)")
        }
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        let report: FioReport
        do {
            report = try decoder.decode(FioReport.self, from: Data(output[start...].utf8))
        } catch {
            throw BenchError("fio \(workload.label): cannot read its JSON report: \(error)")
        }
        guard let job = report.jobs.first, job.error == 0 else {
            throw BenchError("fio \(workload.label): the job failed (error \(report.jobs.first?.error ?? -1))")
        }
        return job
    }

    private static func output(of command: [String]) throws -> String {
        let pipe = Pipe()
        let process = try start(command, standardOutput: pipe)
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        try checkExit(process, command)
        return String(decoding: data, as: UTF8.self)
    }

    /// Starts `command`, looked up in PATH, with this process's stderr.
    private static func start(_ command: [String], standardOutput: Pipe) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = command
        process.standardOutput = standardOutput
        do {
            try process.run()
        } catch {
            throw BenchError("cannot start \(command[0]): \(error)")
        }
        return process
    }

    private static func checkExit(_ process: Process, _ command: [String]) throws {
        guard process.terminationReason == .exit, process.terminationStatus == 0 else {
            let why = process.terminationStatus == 127 ? "not found" : "exit status \(process.terminationStatus)"
            throw BenchError("\(command.joined(separator: " ")) failed (\(why))")
        }
    }
}

/// The parts of fio's `--output-format=json` the benchmark reads. With
/// `--group_reporting` the jobs of a run are summed into one entry.
private struct FioReport: Decodable {
    struct Job: Decodable {
        struct Direction: Decodable {
            let ioBytes: Int
            let totalIos: Int
            /// Milliseconds.
            let runtime: Int
        }

        let error: Int
        let read: Direction
        let write: Direction
        /// Percent of `jobRuntime`, summed over the group's jobs.
        let usrCpu: Double
        let sysCpu: Double
        /// Milliseconds, summed over the group's jobs.
        let jobRuntime: Int
    }

    let jobs: [Job]
}
