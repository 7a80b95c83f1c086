// swift-tools-version: 6.1
import PackageDescription

// Release builds drop Swift's dynamic exclusivity checks in our own modules:
// they cost a fifth of the user-space instructions on the I/O path (measured
// with perf stat on 4k requests) and the engine's shared state is guarded by
// locks and atomics, not by exclusivity enforcement. They also optimise
// across our modules: a request crosses NBD, BlockTargets, Mirror and DMIO,
// and without it each small call between them stays a call (1M writes on
// one connection lost 5-8 % when the target contract got a module of its
// own; BENCHMARKS.md, the redesign of issue 13).
let hotPath: [SwiftSetting] = [
    .unsafeFlags(["-enforce-exclusivity=unchecked", "-cross-module-optimization"], .when(configuration: .release)),
]

let package = Package(
    name: "dmio-nbd",
    products: [
        .library(name: "DMIO", targets: ["DMIO"]),
        .library(name: "LibNBD", targets: ["LibNBD"]),
        .library(name: "BlockTargets", targets: ["BlockTargets"]),
        .library(name: "NBD", targets: ["NBD"]),
        .library(name: "Mirror", targets: ["Mirror"]),
        .library(name: "Monitoring", targets: ["Monitoring"]),
        .executable(name: "dmio-nbd", targets: ["dmio-nbd"]),
        .executable(name: "dmio-bench", targets: ["dmio-bench"]),
        .executable(name: "dmio-copy-example", targets: ["dmio-copy-example"]),
    ],
    dependencies: [
        .package(url: "https://github.com/ordo-one/malloc-interposer", from: "1.6.1"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.0"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.0"),
    ],
    targets: [
        // C libraries from Debian's -dev packages, each wrapped by a Swift
        // module of its own (URing, LibNBD; libblkid by DMIO's signature probe). Their shim headers import
        // Glibc's module first, so that their glibc declarations (fd_set)
        // do not clash with Glibc's in files that import both.
        .systemLibrary(
            name: "CLibURing", pkgConfig: "liburing",
            providers: [.apt(["liburing-dev"])]),
        .systemLibrary(
            name: "CLibNBD", pkgConfig: "libnbd",
            providers: [.apt(["libnbd-dev"])]),
        .systemLibrary(
            name: "CLibBlkid", pkgConfig: "blkid",
            providers: [.apt(["libblkid-dev"])]),
        .target(name: "URing", dependencies: ["CLibURing"], swiftSettings: hotPath),
        .target(name: "LibNBD", dependencies: ["CLibNBD"], swiftSettings: hotPath),
        .target(name: "CDMIOSupport"),
        .target(
            name: "DMIO",
            dependencies: ["URing", "LibNBD", "CLibBlkid", "CDMIOSupport", .product(name: "Atomics", package: "swift-atomics")],
            swiftSettings: hotPath),
        .target(name: "BlockTargets", dependencies: ["DMIO"], swiftSettings: hotPath),
        .target(
            name: "NBD",
            dependencies: [
                "DMIO", "BlockTargets", "CDMIOSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: hotPath),
        .target(
            name: "Mirror",
            dependencies: ["DMIO", "BlockTargets", .product(name: "Logging", package: "swift-log")],
            swiftSettings: hotPath),
        .target(
            name: "Monitoring",
            dependencies: [
                "DMIO", "BlockTargets", "Mirror",
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]),
        // The control socket's requests: parsed on their own (fuzzed).
        .target(name: "ControlProtocol"),
        .executableTarget(
            name: "dmio-nbd",
            dependencies: [
                "DMIO", "LibNBD", "BlockTargets", "NBD", "Mirror", "Monitoring", "CDMIOSupport", "ControlProtocol",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: hotPath,
            plugins: ["BuildInfo"]),
        .plugin(name: "BuildInfo", capability: .buildTool()),

        .executableTarget(
            name: "dmio-bench",
            dependencies: [
                "DMIO",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "MallocInterposerSwift", package: "malloc-interposer"),
            ],
            path: "Benchmarks/dmio-bench",
            swiftSettings: hotPath),
        .executableTarget(
            name: "dmio-copy-example", dependencies: ["DMIO"], path: "examples/copy-region"),

        // Fuzzing (`make fuzz`): the inputs the server reads from outside,
        // one libFuzzer executable each (built by product, with FUZZING),
        // replayed from their corpus and crashes by FuzzReplayTests.
        .target(
            name: "Fuzzing",
            dependencies: [
                "NBD", "Mirror", "BlockTargets", "DMIO", "ControlProtocol", "TestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Fuzz/Fuzzing"),
        .executableTarget(name: "fuzz-handshake", dependencies: ["Fuzzing"], path: "Fuzz/Targets/handshake"),
        .executableTarget(name: "fuzz-requests", dependencies: ["Fuzzing"], path: "Fuzz/Targets/requests"),
        .executableTarget(name: "fuzz-metadata", dependencies: ["Fuzzing"], path: "Fuzz/Targets/metadata"),
        .executableTarget(name: "fuzz-control", dependencies: ["Fuzzing"], path: "Fuzz/Targets/control"),

        .target(name: "TestSupport", dependencies: ["LibNBD", "BlockTargets", "DMIO"], path: "Tests/TestSupport"),
        .testTarget(name: "DMIOTests", dependencies: ["DMIO", "LibNBD", "TestSupport"]),
        .testTarget(
            name: "NBDTests",
            dependencies: [
                "NBD", "BlockTargets", "DMIO", "LibNBD", "TestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        .testTarget(name: "FuzzReplayTests", dependencies: ["Fuzzing"], path: "Fuzz/ReplayTests"),
        .testTarget(
            name: "MirrorTests",
            dependencies: [
                "Mirror", "BlockTargets", "NBD", "DMIO", "Monitoring", "LibNBD", "TestSupport",
                .product(name: "Logging", package: "swift-log"),
            ]),
    ],
    swiftLanguageModes: [.v5]
)
