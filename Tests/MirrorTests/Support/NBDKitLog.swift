import Foundation

/// What nbdkit's log filter has written to its file so far: each request a
/// connection sent, with the lines it began and ended at, and how many
/// connections came and went. A request is known by its connection and
/// its id together: nbdkit numbers requests per connection.
struct NBDKitLog {
    struct Request: Hashable {
        /// The log's `connection=N`.
        let connection: Int
        /// The log's `id=N`, counted per connection.
        let id: Int
        /// `Write`, `Flush`, `Read`, `Zero`, `Trim`, ...
        let command: String
        /// Where it goes: nil for a flush.
        let offset: UInt64?
        /// The line it began at, counted from 0: an order across connections.
        let sent: Int
        /// The line nbdkit said it was done at; nil while it is under way.
        var done: Int?
    }

    private(set) var requests: [Request] = []
    private(set) var connects = 0
    private(set) var disconnects = 0

    /// The log in `path`; empty if nbdkit has written none yet.
    init(path: String) {
        let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
        var started: [RequestKey: Int] = [:]
        // Whole lines only: nbdkit may be writing the last one.
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).dropLast()
        for (line, text) in lines.enumerated() {
            let words = text.split(separator: " ")
            // "<date> <time> connection=N <command> id=M ...": lines
            // without a connection are the server's own.
            guard let at = words.firstIndex(where: { $0.hasPrefix("connection=") }), at + 1 < words.count,
                  let connection = Self.value(of: "connection=", in: words[at]).flatMap(Int.init(exactly:)) else { continue }
            let command = words[at + 1]
            switch command {
            case "Connect": connects += 1
            case "Disconnect": disconnects += 1
            default:
                guard let id = words.lazy.compactMap({ Self.value(of: "id=", in: $0) }).first.flatMap(Int.init(exactly:)) else { continue }
                let key = RequestKey(connection: connection, id: id)
                if command.hasPrefix("...") {
                    if let index = started[key] { requests[index].done = line }
                } else {
                    let offset = words.lazy.compactMap { Self.value(of: "offset=0x", in: $0, radix: 16) }.first
                    started[key] = requests.count
                    requests.append(Request(connection: connection, id: id, command: String(command),
                                            offset: offset, sent: line))
                }
            }
        }
    }

    /// The requests of `command` (`Write`, `Flush`, ...).
    func requests(_ command: String) -> [Request] { requests.filter { $0.command == command } }

    /// Connections open at nbdkit: each `Connect` less each `Disconnect`.
    var openConnections: Int { connects - disconnects }

    private struct RequestKey: Hashable {
        let connection: Int
        let id: Int
    }

    /// The number after `name` in a word `name<number>`, if the word is that.
    private static func value(of name: String, in word: Substring, radix: Int = 10) -> UInt64? {
        guard word.hasPrefix(name) else { return nil }
        return UInt64(word.dropFirst(name.count), radix: radix)
    }
}
