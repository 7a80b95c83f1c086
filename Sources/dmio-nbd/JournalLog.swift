import Glibc
import Logging

/// The log when standard error is the journal (systemd sets
/// JOURNAL_STREAM to its device and inode): each line starts with its
/// syslog priority (`<4>`), which the journal keeps (`journalctl -p
/// warning` filters on it), and carries no timestamp of its own (the
/// journal stamps every line).
struct JournalLogHandler: LogHandler {
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var all = metadata
        if let provided = metadataProvider?.get() { all.merge(provided) { $1 } }
        if let given = event.metadata { all.merge(given) { $1 } }
        let context = all.isEmpty ? "" : "[" + all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ") + "] "
        let line = "<\(Self.priority(event.level))>\(context)\(event.message)\n"
        _ = line.withCString { write(STDERR_FILENO, $0, strlen($0)) }
    }

    /// syslog's priorities: 7 debug … 2 critical.
    static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: 7
        case .info: 6
        case .notice: 5
        case .warning: 4
        case .error: 3
        case .critical: 2
        }
    }

    /// Whether standard error is the stream JOURNAL_STREAM names (not only
    /// a child of a service that inherited the variable).
    static var standardErrorIsJournal: Bool {
        guard let stream = environment("JOURNAL_STREAM") else { return false }
        var info = stat()
        guard fstat(STDERR_FILENO, &info) == 0 else { return false }
        return stream == "\(info.st_dev):\(info.st_ino)"
    }
}
