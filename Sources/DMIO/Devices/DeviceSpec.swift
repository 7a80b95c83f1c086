/// What a device spec names: a path on this machine (a file or a block
/// device), or an export on a server by URI. The one place that tells them
/// apart; `BlockDevice.open` picks the driver of each by its scheme.
public enum DeviceSpec: Sendable, Hashable {
    case path(String)
    case uri(String, scheme: String)

    /// The URI schemes a device may be named by, and the driver that opens
    /// each: a new kind of remote device is a line here.
    static let drivers: [String: @Sendable (String, DeviceOptions) throws(DMIOError) -> any DeviceDriver] = [
        "nbd": RemoteNBDDevice.init, "nbd+unix": RemoteNBDDevice.init,
        "nbds": RemoteNBDDevice.init, "nbds+unix": RemoteNBDDevice.init,
    ]

    /// Reads `text`: a URI when it names a scheme (`scheme://...`), a path
    /// otherwise. A scheme no driver takes is refused.
    public init(_ text: String) throws(DMIOError) {
        guard Self.isURI(text) else {
            self = .path(text)
            return
        }
        let scheme = text.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        guard Self.drivers[scheme] != nil else { throw .invalidDeviceSpec(text) }
        self = .uri(text, scheme: scheme)
    }

    /// Whether `text` names a scheme, known or not: there is then no path
    /// to look for on this machine (opening it says whether it is valid).
    public static func isURI(_ text: String) -> Bool { text.contains("://") }

    /// The driver of this spec, opened.
    func open(options: DeviceOptions) throws(DMIOError) -> any DeviceDriver {
        switch self {
        case .path(let path): try LocalDevice(path: path, options: options)
        case .uri(let uri, let scheme): try Self.drivers[scheme]!(uri, options)
        }
    }
}
