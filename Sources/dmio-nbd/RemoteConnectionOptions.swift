import ArgumentParser
import DMIO

/// `--remote-connections`: how many connections each remote leg gets, for
/// the commands that open a mirror's legs to serve or make it (`serve`,
/// `create`). A leg's URI may say otherwise (`connections=N`).
struct RemoteConnectionOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Connections to each remote leg whose server offers multi-conn (default "
                               + "\(DeviceOptions.defaultRemoteConnections); a server without it gets one); "
                               + "a leg's URI may say connections=N.", valueName: "count"))
    var remoteConnections: Int?

    func validate() throws {
        let range = DeviceOptions.remoteConnectionRange
        if let remoteConnections, !range.contains(remoteConnections) {
            throw ValidationError("--remote-connections: \(remoteConnections) is not a number of connections "
                                  + "from \(range.lowerBound) to \(range.upperBound)")
        }
    }
}
