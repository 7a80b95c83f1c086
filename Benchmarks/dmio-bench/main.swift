// dmio-bench: DMIO's async path against fio's io_uring engine on the same
// files, in the same run. See `dmio-bench --help` and BENCHMARKS.md.
import Glibc

// Counting mallocs needs the interposer preloaded before anything allocates,
// so this comes before argument parsing.
do {
    try MallocCounter.preloadInterposer()
} catch {
    fputs("dmio-bench: \(error)\n", stderr)
    exit(1)
}
DMIOBench.main()
