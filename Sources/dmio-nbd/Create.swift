import ArgumentParser
import DMIO
import Glibc
import Mirror

struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make a new mirror of two or more legs.",
        discussion: """
            Makes a new, empty mirror: its metadata takes the first MiB of each leg (more on legs \
            over 4 TiB) and its data starts after it, so whatever the legs held is no longer \
            readable through the mirror. Legs that do not exist are made as sparse files of \
            --size. When every leg is new (all zeroes) the legs start in sync; otherwise, at \
            the first serve, leg 0's bytes are copied to the others so that the legs agree \
            (--assume-clean skips that copy when they already do).
            """)

    @Argument(help: "The legs: files, block devices or NBD URIs, all of one size.")
    var legs: [String]

    @Option(help: ArgumentHelp("Make missing legs as sparse files of this size (e.g. 1G).", valueName: "size"),
            transform: ByteSize.parse)
    var size: ByteSize?

    @Option(help: ArgumentHelp("Bytes of data per bit of the write-intent bitmap (default 512K).", valueName: "size"),
            transform: ByteSize.parse)
    var regionSize: ByteSize?

    @Option(help: ArgumentHelp("Make leg N write-mostly: read only when no other leg in sync can be, and written "
                               + "behind (serve's --write-behind). Give it once per leg.", valueName: "N"))
    var writeMostly: [Int] = []

    @Flag(help: "Overwrite legs that already belong to a mirror, or hold a file system or a partition table.")
    var force = false

    @Flag(help: "The legs already hold the same data (all zeroes, or copies): skip the first copy.")
    var assumeClean = false

    @OptionGroup(title: "Remote legs over TLS")
    var remoteTLS: RemoteTLSOptions

    @OptionGroup var connectionOptions: RemoteConnectionOptions

    func validate() throws {
        guard legs.count >= 2 else { throw ValidationError("a mirror needs at least 2 legs") }
        if let twice = duplicate(in: legs) { throw ValidationError("\(twice) is given twice") }
        try checkLegSpecs(legs)
        if let leg = writeMostly.first(where: { !legs.indices.contains($0) }) {
            throw ValidationError("--write-mostly \(leg): the mirror has legs 0 to \(legs.count - 1)")
        }
    }

    func run() throws {
        let client = try DMIOClient()
        let logger = makeLogger(verbose: false)
        let specs = legs.map(absolutePath)
        let missing = specs.filter { !DeviceSpec.isURI($0) && access($0, F_OK) != 0 }
        if !missing.isEmpty && size == nil {
            throw CleanExit.message("\(missing.joined(separator: ", ")) do not exist; --size makes them", code: 1)
        }
        let regionBytes = try checkedRegionBytes(regionSize)
        if let size, !missing.isEmpty { try checkLegSize(size, regionBytes: regionBytes) }
        // A create that fails leaves no file it made behind.
        var made: [String] = []
        do {
            var devices: [BlockDevice] = []
            for spec in specs {
                let options = DeviceOptions(createSize: size?.bytes, remoteTLS: remoteTLS.settings,
                                            remoteConnections: connectionOptions.remoteConnections)
                let device = try openLeg(spec, options: options, logger: logger)
                if device.wasCreated { made.append(spec) }
                devices.append(device)
            }
            let inSync = missing.count == specs.count || assumeClean
            let uuid = try Mirror.create(devices, client: client, regionBytes: regionBytes, fresh: inSync, force: force,
                                         writeMostly: Set(writeMostly), logger: logger)
            let layout = try MirrorLayout(legBytes: devices[0].size, regionBytes: regionBytes)
            print("made mirror \(uuid): \(specs.count) legs, \(layout.dataBytes >> 20) MiB of data"
                  + (inSync ? ", in sync" : "; " + (specs.count == 2 ? "leg 1 gets" : "legs 1 to \(specs.count - 1) get")
                     + " a copy of leg 0 when served"))
        } catch {
            for path in made { unlink(path) }
            throw error is CleanExit ? error : CleanExit.message("\(error)", code: 1)
        }
    }
}

/// The region size asked for (the default when none), refused as typed
/// when it cannot be one.
func checkedRegionBytes(_ size: ByteSize?) throws -> UInt32 {
    guard let size else { return MirrorLayout.defaultRegionBytes }
    guard size.bytes <= UInt64(UInt32.max), (try? MirrorLayout(legBytes: .max / 2, regionBytes: UInt32(size.bytes))) != nil else {
        throw CleanExit.message("--region-size \(size): a region is a power of two of at least 4 KiB (4K, 64K, 512K...)",
                                code: 1)
    }
    return UInt32(size.bytes)
}

/// Refuses, before any file is made, a leg size that cannot hold a mirror
/// leg, saying the size as it was typed.
func checkLegSize(_ size: ByteSize, regionBytes: UInt32) throws {
    do {
        _ = try MirrorLayout(legBytes: size.bytes & ~511, regionBytes: regionBytes)
    } catch {
        guard case .legTooSmall(_, let needed) = error else { throw CleanExit.message("\(error)", code: 1) }
        throw CleanExit.message("--size \(size) is too small for a leg: a mirror leg needs at least \(needed) bytes "
                                + "(its metadata and one region)", code: 1)
    }
}
