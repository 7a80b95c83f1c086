import CDMIOSupport
import CLibBlkid
import Glibc

/// Something a device holds that writing over it would destroy: a file
/// system, a partition table, an LVM or md member, as libblkid (what
/// `blkid` and `wipefs` use) recognises it.
public struct DeviceSignature: Sendable, Hashable, CustomStringConvertible {
    /// blkid's TYPE ("ext4", "LVM2_member") or PTTYPE ("gpt", "dos").
    public let type: String
    /// blkid's USAGE ("filesystem", "raid", "crypto", "other"), or
    /// "partition table".
    public let usage: String
    public let label: String?
    public let uuid: String?

    /// "an ext4 file system (label "data", UUID 1b2c…)", as mdadm --create
    /// warns of "an ext2fs file system".
    public var description: String {
        let what: String = switch (usage, type) {
        case ("partition table", _): "a \(type) partition table"
        case (_, "linux_raid_member"): "an md RAID member"
        case (_, "LVM2_member"): "an LVM physical volume"
        case (_, "crypto_LUKS"): "a LUKS encrypted volume"
        case (_, "swap"): "swap space"
        case ("filesystem", _): "\(type.first.map { "aeiou".contains($0) } == true ? "an" : "a") \(type) file system"
        default: "a \(type) signature"
        }
        let details = [label.map { "label \"\($0)\"" }, uuid.map { "UUID \($0)" }].compactMap { $0 }
        return details.isEmpty ? what : "\(what) (\(details.joined(separator: ", ")))"
    }
}

extension BlockDevice {
    /// Every signature libblkid finds on the device, in its order. A remote
    /// export is probed through a copy of its first 4 MiB and last 1 MiB
    /// (where signatures live) in a sparse file in memory.
    public func signatures(client: DMIOClient) throws(DMIOError) -> [DeviceSignature] {
        guard kind == .remote else {
            guard let probe = blkid_new_probe_from_filename(name) else {
                throw .openFailed(device: name, errno: errno == 0 ? EIO : errno)
            }
            return Self.signatures(probe)
        }
        let copy = dmio_memfd("dmio-probe")
        guard copy >= 0 else { throw .openFailed(device: name, errno: errno) }
        defer { close(copy) }
        guard ftruncate(copy, off_t(size)) == 0 else { throw .openFailed(device: name, errno: errno) }
        let head = min(size, 4 << 20), tail = min(size - head, 1 << 20)
        for (offset, count) in [(0, head), (size - tail, tail)] where count > 0 {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(count), alignment: pageSize)
            defer { buffer.deallocate() }
            let result = try client.sync(.read, regions: [IORegion(device: self, sector: offset >> 9, count: count >> 9)],
                                         buffer: buffer)
            if let failure = result.failures.first { throw .openFailed(device: name, errno: failure.errno) }
            guard pwrite(copy, buffer.baseAddress, buffer.count, off_t(offset)) == buffer.count else {
                throw .openFailed(device: name, errno: errno)
            }
        }
        guard let probe = blkid_new_probe() else { throw .openFailed(device: name, errno: ENOMEM) }
        guard blkid_probe_set_device(probe, copy, 0, 0) == 0 else {
            blkid_free_probe(probe)
            throw .openFailed(device: name, errno: EIO)
        }
        return Self.signatures(probe)
    }

    /// Runs `probe` through every superblock and partition-table prober,
    /// as wipefs does (damaged checksums count: it is still someone's data).
    private static func signatures(_ probe: blkid_probe) -> [DeviceSignature] {
        defer { blkid_free_probe(probe) }
        blkid_probe_enable_superblocks(probe, 1)
        blkid_probe_set_superblocks_flags(probe, BLKID_SUBLKS_TYPE | BLKID_SUBLKS_USAGE | BLKID_SUBLKS_LABEL
                                          | BLKID_SUBLKS_UUID | BLKID_SUBLKS_BADCSUM)
        blkid_probe_enable_partitions(probe, 1)
        blkid_probe_set_partitions_flags(probe, BLKID_PARTS_MAGIC)
        func value(_ name: String) -> String? {
            var data: UnsafePointer<CChar>?
            guard blkid_probe_lookup_value(probe, name, &data, nil) == 0, let data else { return nil }
            let text = String(cString: data)
            return text.isEmpty ? nil : text
        }
        var found: [DeviceSignature] = []
        while blkid_do_probe(probe) == 0 {
            if let type = value("TYPE") {
                found.append(DeviceSignature(type: type, usage: value("USAGE") ?? "other", label: value("LABEL"),
                                             uuid: value("UUID")))
            } else if let table = value("PTTYPE") {
                found.append(DeviceSignature(type: table, usage: "partition table", label: nil, uuid: value("PTUUID")))
            }
        }
        return found
    }
}
