import ArgumentParser
import ControlProtocol
import Glibc
import Mirror

/// `dmio-nbd check` and `dmio-nbd repair` (md's `echo check > sync_action`,
/// DRBD's `drbdadm verify`): ask the server for a scrub, and with --wait
/// follow it to its end.
struct ScrubOptions: ParsableArguments {
    @Flag(help: "Wait for the end, then print the report; exit 2 when it found copies that differ (see below).")
    var wait = false
    @OptionGroup var control: ControlOptions

    static let discussion = """
        The scrub goes through every region in the background while clients read and write, at \
        most --resync-rate bytes a second, holding each region as a resync does. `dmio-nbd status` \
        shows its progress, speed and ETA and what it found; so do `--json`, the metrics \
        (dmio_scrub_*) and the events (`scrub started|mismatch|read-error|finished`). A region \
        whose copies differ is read again before it counts. A region a leg cannot read is \
        rewritten from another leg, in a check too (as md does).

        With --wait, exit status 0: every region compared and nothing left differing; 2: copies \
        differ (a check), or a repair left some (no majority, or a rewrite failed), or a copy \
        could not be read and was not rewritten; 1: it did not run to the end.
        """

    /// Asks for `request` and, with --wait, follows the scrub to its end.
    func run(_ request: ControlRequest.Command) throws {
        let socket = try control.oneControl()
        var report = try control.ask(ControlRequest(command: request), of: socket)
        guard wait else { return control.print([report]) }
        while report.mirror.scrub?.active ?? false {
            usleep(250_000)
            report = try control.ask(ControlRequest(command: .status), of: socket)
        }
        control.print([report])
        guard let scrub = report.mirror.scrub else { return }
        if scrub.result != "done" { throw CleanExit.message("the \(scrub.action) did not finish: \(scrub.result ?? "")", code: 1) }
        if !scrub.isClean { throw ExitCode(2) }
    }
}

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compare the legs in sync, region by region, online; count the regions that differ.",
        discussion: ScrubOptions.discussion)
    @Flag(help: "Stop the check or repair under way (what it found stays in the status).") var cancel = false
    @OptionGroup var options: ScrubOptions

    func run() throws {
        if cancel && options.wait { throw ValidationError("--cancel stops a scrub; there is nothing to --wait for") }
        try options.run(cancel ? .cancelScrub : .check)
    }
}

struct Repair: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compare the legs in sync and rewrite the copies that differ: the majority's wins.",
        discussion: """
            With three or more legs in sync, the copy that more than half of them hold is written \
            over the others, and the log and the events name the legs outvoted; a region where no \
            copy has a majority is reported, not guessed. With two legs no majority exists: the \
            first in-sync leg's copy wins (as md's repair), and the report says so.

            """ + ScrubOptions.discussion)
    @OptionGroup var options: ScrubOptions

    func run() throws { try options.run(.repair) }
}
