import ArgumentParser
import DMIO
import Mirror

/// `dmio-nbd examine LEG`: a leg's metadata, as `mdadm --examine` shows an
/// md member's. Works while the mirror runs (the leg is opened read-only
/// and not claimed).
struct Examine: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what a leg's metadata says: its mirror, its place, every leg's state.")
    @Argument(help: "A file, a block device or an NBD URI.") var leg: String
    @Flag(help: "Print it as JSON (its fields are in the README).") var json = false
    @OptionGroup(title: "Remote legs over TLS") var remoteTLS: RemoteTLSOptions

    func run() throws {
        let client = try DMIOClient()
        let device = try openLeg(absolutePath(leg),
                                 options: DeviceOptions(readOnly: true, exclusive: false, remoteTLS: remoteTLS.settings),
                                 logger: makeLogger(verbose: false))
        let found: LegMetadata
        do { found = try Mirror.examine(device, client: client) } catch { throw CleanExit.message("\(error)", code: 1) }
        print(json ? encodeJSON(found) : describe(found))
    }

    private func describe(_ found: LegMetadata) -> String {
        let slots = found.slots.enumerated().map { index, slot in
            "slot \(index): " + (slot.events.map { "event \($0)" } ?? slot.problem ?? "")
        }
        var lines = [
            "\(found.device):",
            "      Mirror : \(found.mirror)",
            "         Leg : " + (found.removed == true ? "removed from the mirror (its legs then are below)"
                                                           : "\(found.legIndex) of \(found.legCount)"),
            "      Events : \(found.events) (\(slots.joined(separator: ", ")))",
            "  Generation : \(found.generation)",
            "       Owner : \(found.owner.map { "\($0), while its lease is renewed" } ?? "none")",
            "       State : \(found.clean ? "stopped cleanly" : "in use, or not stopped cleanly")"
                + (found.servedRaw ? ", served on its own since (it gets a full copy)" : ""),
            "   Bit clear : event \(found.eventsCleared)",
            "     Regions : \(found.regionBytes >> 10) KiB each, \(found.dirtyRegions) dirty",
            "    Leg size : \(found.legBytes) bytes (data from \(found.dataOffset), \(found.dataBytes) bytes)",
            "",
            "  leg  state       uuid                                  why out        last served as",
        ]
        for leg in found.legs {
            let why = leg.state == .degraded ? [leg.cause?.word, leg.errno].compactMap { $0 }.joined(separator: ": ") : ""
            let state = leg.state.description + (leg.replaces.map { " for \($0)" } ?? "")
                + (leg.writeMostly == true ? ", write-mostly" : "")
            lines.append("  " + "\(leg.index)".padded(5) + state.padded(12) + leg.uuid.padded(38)
                         + (why.isEmpty ? "-" : why).padded(15) + (leg.name ?? "-"))
        }
        return lines.joined(separator: "\n")
    }
}

/// `dmio-nbd wipe LEG`: erases a leg's mirror metadata so that the device
/// can be used for something else (mdadm --zero-superblock).
struct Wipe: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Erase a leg's mirror metadata (refused while its mirror is served).",
        discussion: "The data after the metadata is left as it is; the device no longer belongs to the mirror.")
    @Argument(help: "A file, a block device or an NBD URI.") var leg: String
    @OptionGroup(title: "Remote legs over TLS") var remoteTLS: RemoteTLSOptions

    func run() throws {
        let client = try DMIOClient()
        let device = try openLeg(absolutePath(leg), options: DeviceOptions(remoteTLS: remoteTLS.settings),
                                 logger: makeLogger(verbose: false))
        do {
            print("wiped \(try Mirror.wipe(device, client: client)) from \(device.name)")
        } catch {
            throw CleanExit.message("\(error)", code: 1)
        }
    }
}

extension String {
    /// The text and spaces after it to `width` columns (one space at least).
    func padded(_ width: Int) -> String {
        self + String(repeating: " ", count: max(1, width - count))
    }
}
