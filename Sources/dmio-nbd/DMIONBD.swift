import ArgumentParser

@main
struct DMIONBD: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dmio-nbd",
        abstract: "A userspace block device served over NBD.",
        subcommands: [Serve.self])
}
