import Glibc

/// Who holds a block device that refused an exclusive open (EBUSY), in a
/// person's words: where it, or a partition of it, is mounted; the md array
/// or device-mapper device built on it; swap; the processes that have it
/// open. nil when none of these shows (another program claimed it).
enum DeviceHolders {
    static func describe(_ device: dev_t) -> String? {
        var found = uses(of: device)
        for partition in partitions(of: device) {
            found += uses(of: partition.device).map { "its partition \(partition.name) is \($0)" }
        }
        if found.isEmpty { found = openers(of: device) }
        return found.isEmpty ? nil : found.joined(separator: "; ")
    }

    /// Mounts, stacked devices and swap on `device` itself.
    private static func uses(of device: dev_t) -> [String] {
        let number = sysfsNumber(device)
        var uses: [String] = []
        for line in readText("/proc/self/mountinfo")?.split(separator: "\n") ?? [] {
            // id parent major:minor root mount-point ...
            let fields = line.split(separator: " ")
            if fields.count > 4, fields[2] == number { uses.append("mounted on \(unescaped(fields[4]))") }
        }
        for holder in directoryEntries("/sys/dev/block/\(number)/holders") {
            if let name = readText("/sys/block/\(holder)/dm/name")?.trimmed, !name.isEmpty {
                uses.append("held by device-mapper device \(holder) (\(name))")
            } else if holder.hasPrefix("md") {
                uses.append("part of md array \(holder)")
            } else {
                uses.append("held by \(holder)")
            }
        }
        for line in (readText("/proc/swaps")?.split(separator: "\n") ?? []).dropFirst() {
            var info = stat()
            if let path = line.split(separator: " ").first, stat(String(path), &info) == 0,
               info.st_mode & S_IFMT == S_IFBLK, info.st_rdev == device {
                uses.append("in use as swap")
            }
        }
        return uses
    }

    private static func partitions(of device: dev_t) -> [(name: String, device: dev_t)] {
        let folder = "/sys/dev/block/\(sysfsNumber(device))"
        return directoryEntries(folder).compactMap { name in
            guard access("\(folder)/\(name)/partition", F_OK) == 0,
                  let number = readText("\(folder)/\(name)/dev")?.trimmed.split(separator: ":"),
                  number.count == 2, let major = UInt32(number[0]), let minor = UInt32(number[1]) else { return nil }
            return (name, makeDevice(major: major, minor: minor))
        }
    }

    /// "open by pid 4242 (dmio-nbd)" for each process with `device` open.
    private static func openers(of device: dev_t) -> [String] {
        OpenFiles.holders { _, info in info.st_mode & S_IFMT == S_IFBLK && info.st_rdev == device }.map { "open by \($0)" }
    }

    /// Mount points in mountinfo escape spaces and the like as \040.
    private static func unescaped(_ field: Substring) -> String {
        var bytes: [UInt8] = []
        var rest = Array(field.utf8)[...]
        while let byte = rest.popFirst() {
            if byte == UInt8(ascii: "\\"), rest.count >= 3, let code = UInt8(String(decoding: rest.prefix(3), as: UTF8.self), radix: 8) {
                bytes.append(code)
                rest = rest.dropFirst(3)
            } else {
                bytes.append(byte)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// "major:minor" of a device number, as sysfs and mountinfo name it
/// (glibc's encoding of the two in a dev_t).
func sysfsNumber(_ device: dev_t) -> String {
    let major = (device >> 32) & 0xFFFF_F000 | (device >> 8) & 0xFFF
    let minor = (device >> 12) & 0xFFFF_FF00 | device & 0xFF
    return "\(major):\(minor)"
}

private func makeDevice(major: UInt32, minor: UInt32) -> dev_t {
    let (major, minor) = (dev_t(major), dev_t(minor))
    return (major & 0xFFF) << 8 | (major & ~0xFFF) << 32 | (minor & 0xFF) | (minor & ~0xFF) << 12
}
