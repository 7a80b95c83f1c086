// Copies a region of one file to two other files with one DMIO write, the
// way dm-io's callers (dm-raid1, dm-kcopyd) use it, and prints the error bits.
//
//   swift run dmio-copy-example SOURCE DEST1 DEST2 [SECTOR COUNT]
//
// Without arguments it makes three small files in a temporary folder.
import DMIO
import Glibc

func fail(_ message: String) -> Never {
    fputs("dmio-copy-example: \(message)\n", stderr)
    exit(1)
}

var arguments = Array(CommandLine.arguments.dropFirst())
if arguments.isEmpty {
    var template = Array("/tmp/dmio-example-XXXXXX".utf8CString)
    guard let folder = mkdtemp(&template) else { fail("mkdtemp: \(errnoDescription(errno))") }
    let path = String(cString: folder)
    arguments = ["\(path)/source", "\(path)/copy-a", "\(path)/copy-b"]
    for (index, file) in arguments.enumerated() {
        let fd = open(file, O_CREAT | O_WRONLY, 0o644)
        ftruncate(fd, 1 << 20)
        if index == 0 {
            let text = Array("hello from dm-io\n".utf8)
            _ = pwrite(fd, text, text.count, 0)
        }
        close(fd)
    }
    print("made \(arguments.joined(separator: " "))")
}
guard arguments.count == 3 || arguments.count == 5 else {
    fail("usage: dmio-copy-example SOURCE DEST1 DEST2 [SECTOR COUNT]")
}
let sector = arguments.count == 5 ? UInt64(arguments[3]) ?? 0 : 0
let count = arguments.count == 5 ? UInt64(arguments[4]) ?? 8 : 8

do {
    // dm_io_client_create, then dm_io_get: pages for one region in flight.
    let client = try DMIOClient()
    print("engine \(client.engineKind)")
    let pages = Int((count * UInt64(sectorSize) + UInt64(pageSize) - 1) / UInt64(pageSize))
    client.get(pages: pages)
    defer { client.put(pages: pages) }

    let source = try BlockDevice.open(arguments[0], options: DeviceOptions(readOnly: true))
    let targets = try arguments[1...2].map { try BlockDevice.open($0) }

    // Read one region into a page list (dm_io_sync with a page_list)...
    let buffer = client.allocatePages(pages)
    defer { client.release(buffer) }
    let read = try client.sync(.read, regions: [IORegion(device: source, sector: sector, count: count)],
                               pages: buffer, offset: 0)
    print("read  \(source) sectors \(sector)+\(count): error bits \(read.errorBits)")

    // ...and write it to both targets with one call: one bit per region.
    let regions = targets.map { IORegion(device: $0, sector: sector, count: count) }
    let written = try client.sync(.write, regions: regions, pages: buffer, offset: 0, flags: .fua)
    print("write \(targets.map(\.name).joined(separator: ", ")): error bits \(written.errorBits) (\(written))")
    exit(written.succeeded && read.succeeded ? 0 : 1)
} catch {
    fail("\(error)")
}
