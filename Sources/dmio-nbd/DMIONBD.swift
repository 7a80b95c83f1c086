import ArgumentParser
import Glibc

/// The release; `--version` adds the commit it was built from.
let dmioVersion = "0.6.0"

struct DMIONBD: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dmio-nbd",
        abstract: "A mirrored block device served over NBD.",
        discussion: """
            With no subcommand, serves: `dmio-nbd` alone serves the default two-leg mirror, and \
            `dmio-nbd /srv/a.img /srv/b.img` (legs given as paths or URIs) serves those.

            Exit status: 0 done (or a clean stop); 1 refused or failed, with a message that says \
            why, or a stop forced by a second signal; 64 a command line that could not be read.
            """,
        subcommands: [Serve.self, Create.self, Status.self, Events.self, FailLeg.self, ReaddLeg.self, ReplaceLeg.self,
                      AddLeg.self, RemoveLeg.self, SetLeg.self, Check.self, Repair.self, Examine.self, Wipe.self],
        defaultSubcommand: Serve.self)
}

/// The entry point: reads the command line itself where ArgumentParser
/// would guess (a mistyped command must not be taken for a leg that
/// `--create` then makes), and turns refusals into their exit codes.
@main
enum Main {
    static func main() async {
        let arguments = Array(CommandLine.arguments.dropFirst())
        if arguments.first == "--version" {
            print("dmio-nbd \(dmioVersion) (commit \(buildCommit))")
            return
        }
        do {
            let (words, implicitServe) = try withCommand(arguments)
            var command = try DMIONBD.parseAsRoot(words)
            // `dmio-nbd --create 1G stauts` must not make and serve ./stauts either.
            if implicitServe, let serve = command as? Serve, let word = serve.legs.first(where: { !$0.contains("/") }) {
                throw unknownCommand(word)
            }
            if var asynchronous = command as? AsyncParsableCommand {
                try await asynchronous.run()
            } else {
                try command.run()
            }
        } catch let exit as CleanExit {
            printError(exit.description)
            Glibc.exit(exit.code)
        } catch {
            // Help, or a command line ArgumentParser could not read.
            let exitCode = DMIONBD.exitCode(for: error)
            let message = DMIONBD.fullMessage(for: error)
            if exitCode == .success {
                print(message)
            } else if !message.isEmpty {
                printError(withoutForce(message))
            }
            Glibc.exit(exitCode.rawValue)
        }
    }

    static let commands = DMIONBD.configuration.subcommands.map { $0._commandName }

    /// `arguments` with `serve` put first when they are the serve command's
    /// without its name (and whether it was put): nothing, or a first word
    /// that is an option, a path (it has a /) or a URI. Any other first word
    /// must be a command.
    static func withCommand(_ arguments: [String]) throws -> (words: [String], implicitServe: Bool) {
        guard let first = arguments.first else { return (["serve"], true) }
        if commands.contains(first) || ["help", "-h", "--help"].contains(first) { return (arguments, false) }
        if first.hasPrefix("-") || first.contains("/") { return (["serve"] + arguments, true) }
        throw unknownCommand(first)
    }

    /// "unknown command 'stauts'; did you mean 'status'?"
    static func unknownCommand(_ word: String) -> CleanExit {
        var said = "unknown command '\(word)'"
        if let close = commands.min(by: { distance($0, word) < distance($1, word) }), distance(close, word) <= 2 {
            said += "; did you mean '\(close)'?"
        } else if word == "version" {
            said += "; did you mean '--version'?"
        } else {
            said += " (commands: \(commands.joined(separator: ", ")); a leg is given as a path, such as ./\(word))"
        }
        return CleanExit.message(said, code: 64)
    }

    /// An unknown option is not answered with "did you mean --force": a
    /// flag that overwrites data is typed on purpose, never suggested.
    static func withoutForce(_ message: String) -> String {
        message.replacing(" Did you mean '--force'?", with: "")
    }

    private static func printError(_ message: String) {
        let text = (message.hasPrefix("Error: ") || message.hasPrefix("Usage: ") ? message : "Error: \(message)") + "\n"
        fputs(text, stderr)
    }

    /// Levenshtein distance: how many letters to change, add or drop.
    static func distance(_ a: String, _ b: String) -> Int {
        let a = Array(a), b = Array(b)
        var previous = Array(0...b.count)
        for (i, x) in a.enumerated() {
            var current = [i + 1]
            for (j, y) in b.enumerated() {
                current.append(min(previous[j + 1] + 1, current[j] + 1, previous[j] + (x == y ? 0 : 1)))
            }
            previous = current
        }
        return previous[b.count]
    }
}
