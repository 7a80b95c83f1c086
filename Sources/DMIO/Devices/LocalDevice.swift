import CDMIOSupport
import Glibc
import Synchronization

// Block-device ioctls from <linux/fs.h>.
let BLKSSZGET: UInt = 0x1268
let BLKGETSIZE64: UInt = 0x8008_1272
let BLKDISCARD: UInt = 0x1277
let BLKZEROOUT: UInt = 0x127f

/// A regular file or a block device on this machine.
///
/// Files: discard punches a hole, write-zeroes punches a hole (or, with
/// `noUnmap`, uses Linux.zeroRange) and falls back to writing zeroes
/// where the file system cannot. Block devices: size by BLKGETSIZE64, block
/// size by BLKSSZGET, discard by BLKDISCARD, zeroing by a punched hole
/// (the device's write-zeroes command, which may unmap) or, with
/// `noUnmap`, BLKZEROOUT. The engines carry out the system call chosen.
final class LocalDevice: DeviceDriver, @unchecked Sendable {
    /// The path it was opened by, for errors.
    let name: String
    let kind: DeviceKind
    let size: UInt64
    let blockSize: Int
    let isReadOnly: Bool
    let memoryAlignment: Int
    let wasCreated: Bool
    let isInMemory: Bool
    let zeroesCheaply: Bool
    let isBlockDevice: Bool
    let connectionCount: Int? = nil
    let openWarning: String? = nil
    /// The file descriptor the engines do I/O on.
    let fileDescriptor: Int32
    /// fallocate modes this file system refused (EOPNOTSUPP), as a bit mask.
    private let refusedModes = Atomic<Int32>(0)

    init(path: String, options: DeviceOptions) throws(DMIOError) {
        var flags = O_CLOEXEC | (options.readOnly ? O_RDONLY : O_RDWR)
        if options.direct { flags |= dmio_o_direct() }
        // On a block device O_EXCL claims it: the kernel refuses it while it
        // is mounted or part of an md array or a dm device, and refuses all
        // of those (and mkfs) while it is open here.
        var existing = stat()
        let isBlock = stat(path, &existing) == 0 && existing.st_mode & S_IFMT == S_IFBLK
        if isBlock && options.exclusive { flags |= O_EXCL }
        var fd = Glibc.open(path, flags)
        if fd < 0 && errno == EBUSY && isBlock {
            throw .busy(device: path, holder: DeviceHolders.describe(existing.st_rdev))
        }
        var created = false
        if fd < 0 && errno == ENOENT, let createSize = options.createSize, !options.readOnly {
            fd = Glibc.open(path, flags | O_CREAT | O_EXCL, 0o644)
            created = fd >= 0
            if fd >= 0 && ftruncate(fd, off_t(createSize)) != 0 {
                let error = errno
                Glibc.close(fd)
                unlink(path)
                throw .openFailed(device: path, errno: error)
            }
        }
        guard fd >= 0 else { throw .openFailed(device: path, errno: errno) }

        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let error = errno
            Glibc.close(fd)
            throw .openFailed(device: path, errno: error)
        }
        var blockSize = sectorSize
        switch info.st_mode & S_IFMT {
        case S_IFREG:
            isBlockDevice = false
            isInMemory = !options.direct && dmio_file_in_memory(fd) == 1
            zeroesCheaply = true
            size = UInt64(info.st_size)
            // O_DIRECT on a file needs the underlying disk's alignment, which
            // a file cannot tell; a page is right on every Linux disk.
            if options.direct { blockSize = pageSize }
        case S_IFBLK:
            isBlockDevice = true
            isInMemory = false
            zeroesCheaply = Self.queueLimit("write_zeroes_max_bytes", of: info.st_rdev).map { $0 > 0 } ?? false
            var bytes: UInt64 = 0
            var logical: Int32 = 0
            guard ioctl(fd, BLKGETSIZE64, &bytes) == 0, ioctl(fd, BLKSSZGET, &logical) == 0 else {
                let error = errno
                Glibc.close(fd)
                throw .openFailed(device: path, errno: error)
            }
            size = bytes
            if options.direct { blockSize = max(sectorSize, Int(logical)) }
        default:
            Glibc.close(fd)
            throw .openFailed(device: path, errno: (info.st_mode & S_IFMT) == S_IFDIR ? EISDIR : ENODEV)
        }
        name = path
        kind = isBlockDevice ? .blockDevice : .file
        self.blockSize = blockSize
        isReadOnly = options.readOnly
        memoryAlignment = options.direct ? blockSize : 1
        fileDescriptor = fd
        wasCreated = created
    }

    deinit { Glibc.close(fileDescriptor) }

    func issue(_ bio: Bio, batch: inout BioBatch) {
        bio.useSystemCall(command(for: bio.operation, flags: bio.flags), on: fileDescriptor)
        batch.append(bio)
    }

    /// A block device's queue limit from sysfs, nil where it cannot be read.
    private static func queueLimit(_ name: String, of device: dev_t) -> UInt64? {
        readText("/sys/dev/block/\(sysfsNumber(device))/queue/\(name)").flatMap { UInt64($0.prefix { $0.isNumber }) }
    }

    /// The system call that carries out `operation` here.
    private func command(for operation: IOOperation, flags: IOFlags) -> Bio.Command {
        switch operation {
        case .read: return .read
        case .write: return .write
        case .flush: return .sync
        case .discard:
            return isBlockDevice
                ? .blockDeviceRange(request: BLKDISCARD)
                : .allocate(mode: Linux.punchHole)
        case .writeZeroes:
            // A hole punched in a block device is its write-zeroes command,
            // which may unmap, and fails (EOPNOTSUPP) where it has none.
            if isBlockDevice && flags.contains(.noUnmap) { return .blockDeviceRange(request: BLKZEROOUT) }
            let mode = flags.contains(.noUnmap)
                ? Linux.zeroRange
                : Linux.punchHole
            return refusedModes.load(ordering: .relaxed) & mode == mode ? .zeroWrite : .allocate(mode: mode)
        }
    }

    /// fallocate with `mode` cannot zero here: later requests write zeroes
    /// instead.
    func fallocateRefused(mode: Int32) {
        refusedModes.bitwiseOr(mode, ordering: .relaxed)
    }
}
