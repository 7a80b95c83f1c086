// swift-tools-version: 6.1
import PackageDescription

// Release builds drop Swift's dynamic exclusivity checks in our own modules:
// they cost a fifth of the user-space instructions on the I/O path (measured,
// see ../shared/notes/nio-probe.md) and the engine's shared state is guarded
// by locks and atomics, not by exclusivity enforcement.
let hotPath: [SwiftSetting] = [
    .unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release)),
]

let package = Package(
    name: "dmio-nbd",
    products: [
        .library(name: "DMIO", targets: ["DMIO"]),
        .library(name: "LibNBD", targets: ["LibNBD"]),
        .executable(name: "dmio-bench", targets: ["dmio-bench"]),
        .executable(name: "dmio-copy-example", targets: ["dmio-copy-example"]),
    ],
    dependencies: [
        .package(url: "https://github.com/ordo-one/malloc-interposer", from: "1.6.1"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.0"),
    ],
    targets: [
        // C libraries from Debian's -dev packages, each wrapped by a Swift
        // module of its own (URing, LibNBD). Their shim headers import
        // Glibc's module first, so that their glibc declarations (fd_set)
        // do not clash with Glibc's in files that import both.
        .systemLibrary(
            name: "CLibURing", pkgConfig: "liburing",
            providers: [.apt(["liburing-dev"])]),
        .systemLibrary(
            name: "CLibNBD", pkgConfig: "libnbd",
            providers: [.apt(["libnbd-dev"])]),
        .target(name: "URing", dependencies: ["CLibURing"], swiftSettings: hotPath),
        .target(name: "LibNBD", dependencies: ["CLibNBD"], swiftSettings: hotPath),
        .target(name: "CDMIOSupport"),
        .target(name: "DMIO", dependencies: ["URing", "LibNBD", "CDMIOSupport"], swiftSettings: hotPath),

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

        .testTarget(name: "DMIOTests", dependencies: ["DMIO", "LibNBD"]),
    ],
    swiftLanguageModes: [.v5]
)
