import Glibc
import MallocInterposerSwift

/// Counts the mallocs of every thread of this process through
/// MallocInterposerSwift, whose library must be preloaded: linking it only
/// makes its API available, the counting `malloc` has to come first in the
/// symbol search order.
enum MallocCounter {
    static let libraryName = "libMallocInterposerSwift.so"

    /// Makes sure the interposer is loaded: re-executes this program with the
    /// library (found next to the executable) in LD_PRELOAD when it is not
    /// there yet. Once loaded, takes the library out of LD_PRELOAD again so
    /// that fio and other children run without it.
    static func preloadInterposer() throws {
        let preload = getenv("LD_PRELOAD").map { String(cString: $0) } ?? ""
        let entries = preload.split(separator: ":").map(String.init)
        if entries.contains(where: isInterposer) {
            try checkCounting()
            let others = entries.filter { !isInterposer($0) }
            if others.isEmpty { unsetenv("LD_PRELOAD") } else { setenv("LD_PRELOAD", others.joined(separator: ":"), 1) }
            return
        }
        let executable = try executablePath()
        let library = String(executable[..<executable.lastIndex(of: "/")!]) + "/" + libraryName
        guard access(library, R_OK) == 0 else {
            throw BenchError("\(library) not found: build with `swift build -c release --product dmio-bench`, "
                + "or start with LD_PRELOAD=<path to \(libraryName)>")
        }
        setenv("LD_PRELOAD", ([library] + entries).joined(separator: ":"), 1)
        execv(executable, CommandLine.unsafeArgv)
        throw BenchError("cannot re-execute \(executable): \(String(cString: strerror(errno)))")
    }

    /// Counts the mallocs `body` makes, on any thread, while it runs.
    static func counting<Result>(_ body: () -> Result) -> (result: Result, mallocs: Int) {
        MallocInterposerSwift.reset()
        MallocInterposerSwift.hook()
        let result = body()
        MallocInterposerSwift.unhook()
        return (result, MallocInterposerSwift.getStatistics().mallocCount)
    }

    /// Fails unless one known allocation is counted: a library that is in
    /// LD_PRELOAD but not loaded would otherwise report 0 mallocs per I/O.
    private static func checkCounting() throws {
        let (_, mallocs) = counting { allocationSink = malloc(64) }
        free(allocationSink)
        guard mallocs >= 1 else {
            throw BenchError("\(libraryName) is in LD_PRELOAD but counts no mallocs")
        }
    }

    /// Keeps the test allocation observable, so that the optimizer cannot
    /// drop the malloc/free pair.
    nonisolated(unsafe) private static var allocationSink: UnsafeMutableRawPointer?

    private static func isInterposer(_ preloadEntry: String) -> Bool {
        preloadEntry == libraryName || preloadEntry.hasSuffix("/" + libraryName)
    }

    private static func executablePath() throws -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard length > 0 else {
            throw BenchError("cannot find this executable: \(String(cString: strerror(errno)))")
        }
        return String(decoding: buffer[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
