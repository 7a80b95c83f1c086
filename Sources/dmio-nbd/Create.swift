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

    @Option(help: ArgumentHelp("Make missing legs as sparse files of this size (e.g. 1G).", valueName: "size"))
    var size: ByteSize?

    @Option(help: ArgumentHelp("Bytes of data per bit of the write-intent bitmap (default 512K).", valueName: "size"))
    var regionSize: ByteSize?

    @Flag(help: "Overwrite legs that already belong to a mirror, or hold a file system or a partition table.")
    var force = false

    @Flag(help: "The legs already hold the same data (all zeroes, or copies): skip the first copy.")
    var assumeClean = false

    func validate() throws {
        guard legs.count >= 2 else { throw ValidationError("a mirror needs at least 2 legs") }
        if let twice = duplicate(in: legs) { throw ValidationError("\(twice) is given twice") }
    }

    func run() throws {
        let client = try DMIOClient()
        let missing = legs.filter { !$0.contains("://") && access($0, F_OK) != 0 }
        if !missing.isEmpty && size == nil {
            throw CleanExit.message("\(missing.joined(separator: ", ")) do not exist; --size makes them", code: 1)
        }
        let devices = try legs.map { try openLeg($0, options: DeviceOptions(createSize: size?.bytes)) }
        let inSync = missing.count == legs.count || assumeClean
        do {
            let uuid = try Mirror.create(devices, client: client,
                                         regionBytes: regionSize.map { UInt32(clamping: $0.bytes) } ?? MirrorLayout.defaultRegionBytes,
                                         fresh: inSync, force: force, logger: makeLogger(verbose: false))
            let layout = try MirrorLayout(legBytes: devices[0].size)
            print("made mirror \(uuid): \(legs.count) legs, \(layout.dataBytes >> 20) MiB of data"
                  + (inSync ? ", in sync" : "; " + (legs.count == 2 ? "leg 1 gets" : "legs 1 to \(legs.count - 1) get")
                     + " a copy of leg 0 when served"))
        } catch {
            for path in missing { unlink(path) }
            throw CleanExit.message("\(error)", code: 1)
        }
    }
}
