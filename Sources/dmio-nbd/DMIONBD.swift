import ArgumentParser

@main
struct DMIONBD: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dmio-nbd",
        abstract: "A mirrored block device served over NBD.",
        discussion: "With no subcommand, serves: `dmio-nbd` alone serves the default two-leg mirror.",
        subcommands: [Serve.self, Create.self, Status.self, FailLeg.self, ReaddLeg.self, ReplaceLeg.self],
        defaultSubcommand: Serve.self)
}
