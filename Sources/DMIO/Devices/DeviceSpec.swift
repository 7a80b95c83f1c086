/// What a device spec names: a path on this machine (a file or a block
/// device), or an export on a server by URI. The one place that tells them
/// apart; `BlockDevice.open` picks the driver of each by its scheme.
public enum DeviceSpec: Sendable, Hashable {
    case path(String)
    /// A URI as its driver gets it: without the query parameters that are
    /// dmio's own (`connections=N`, in `connections`), which a driver's
    /// library would refuse or misread.
    case uri(String, scheme: String, connections: Int? = nil)

    /// The URI schemes a device may be named by, and the driver that opens
    /// each: a new kind of remote device is a line here.
    static let drivers: [String: Driver] = [
        "nbd": openNBD, "nbd+unix": openNBD, "nbds": openNBD, "nbds+unix": openNBD,
    ]
    typealias Driver = @Sendable (String, DeviceOptions) throws(DMIOError) -> any DeviceDriver
    private static let openNBD: Driver = { uri, options throws(DMIOError) in
        try RemoteNBDDevice(uri: uri, options: options)
    }

    /// Reads `text`: a URI when it names a scheme (`scheme://...`), a path
    /// otherwise. A scheme no driver takes is refused, and so is a bad
    /// value of a parameter of dmio's own.
    public init(_ text: String) throws(DMIOError) {
        guard Self.isURI(text) else {
            self = .path(text)
            return
        }
        let scheme = text.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        guard Self.drivers[scheme] != nil else { throw .invalidDeviceSpec(text) }
        let (uri, connections) = try Self.takeOwnParameters(from: text)
        self = .uri(uri, scheme: scheme, connections: connections)
    }

    /// Whether `text` names a scheme, known or not: there is then no path
    /// to look for on this machine (opening it says whether it is valid).
    public static func isURI(_ text: String) -> Bool { text.contains("://") }

    /// The driver of this spec, opened. A URI's `connections=N` wins over
    /// the options' count.
    func open(options: DeviceOptions) throws(DMIOError) -> any DeviceDriver {
        switch self {
        case .path(let path):
            return try LocalDevice(path: path, options: options)
        case .uri(let uri, let scheme, let connections):
            var options = options
            if let connections { options.remoteConnections = connections }
            return try Self.drivers[scheme]!(uri, options)
        }
    }

    /// `uri` without its `connections=N` query parameter (the others stay,
    /// in their order), and N: 1 to 16, given once.
    private static func takeOwnParameters(from uri: String) throws(DMIOError) -> (uri: String, connections: Int?) {
        guard let mark = uri.firstIndex(of: "?") else { return (uri, nil) }
        var kept: [Substring] = []
        var connections: Int?
        for parameter in uri[uri.index(after: mark)...].split(separator: "&", omittingEmptySubsequences: false) {
            let (name, value) = parameter.firstIndex(of: "=")
                .map { (parameter[..<$0], parameter[parameter.index(after: $0)...]) } ?? (parameter, "")
            guard name == "connections" else {
                kept.append(parameter)
                continue
            }
            guard connections == nil else { throw .invalidDeviceParameter(device: uri, why: "connections is given twice") }
            guard let count = Int(value), DeviceOptions.remoteConnectionRange.contains(count) else {
                let range = DeviceOptions.remoteConnectionRange
                throw .invalidDeviceParameter(device: uri, why: "\(parameter): the connections to a remote device are "
                                              + "a number from \(range.lowerBound) to \(range.upperBound)")
            }
            connections = count
        }
        let stripped = kept.isEmpty ? uri[..<mark] : uri[...mark] + kept.joined(separator: "&")
        return (String(stripped), connections)
    }
}
