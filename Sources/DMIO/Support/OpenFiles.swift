import Glibc

/// The processes that have a file open, found as fuser and lsof find them:
/// by the links in /proc/PID/fd (only the processes this user may look
/// into). For refusals that name who holds what.
public enum OpenFiles {
    /// "pid 4242 (dmio-nbd)" for each process with an open file that
    /// `matches` takes (given the link's target, and what it points at).
    public static func holders(where matches: (_ target: String, _ info: stat) -> Bool) -> [String] {
        var holders: [String] = []
        for pid in directoryEntries("/proc") where pid.allSatisfy(\.isNumber) {
            let holds = directoryEntries("/proc/\(pid)/fd").contains { fd in
                let link = "/proc/\(pid)/fd/\(fd)"
                var info = stat()
                return stat(link, &info) == 0 && matches(linkTarget(link), info)
            }
            if holds { holders.append("pid \(pid) (\(readText("/proc/\(pid)/comm")?.trimmed ?? "?"))") }
        }
        return holders
    }

    private static func linkTarget(_ path: String) -> String {
        var bytes = [CChar](repeating: 0, count: Int(PATH_MAX))
        let count = readlink(path, &bytes, bytes.count - 1)
        return count > 0 ? String(decoding: bytes[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
    }
}

/// The whole of a small file (sysfs, procfs), nil where it cannot be read.
public func readText(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    return String(decoding: readAll(fd), as: UTF8.self)
}

/// What `fd` gives until its end (or an error).
public func readAll(_ fd: Int32) -> [UInt8] {
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let count = read(fd, &chunk, chunk.count)
        if count < 0 && errno == EINTR { continue }
        if count <= 0 { return bytes }
        bytes += chunk[0..<count]
    }
}

/// The names in a folder (not . and ..); none where it cannot be read.
public func directoryEntries(_ path: String) -> [String] {
    guard let directory = opendir(path) else { return [] }
    defer { closedir(directory) }
    var names: [String] = []
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name != "." && name != ".." { names.append(name) }
    }
    return names
}

extension String {
    /// Without the spaces and newlines around it.
    public var trimmed: String {
        String(drop { $0 == " " || $0 == "\n" }.reversed().drop { $0 == " " || $0 == "\n" }.reversed())
    }
}
