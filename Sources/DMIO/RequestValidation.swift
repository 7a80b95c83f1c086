/// Every rule a request must meet, checked before any I/O is issued, so
/// that a refused request writes nothing to any region.
func validate(_ operation: IOOperation, regions: UnsafeBufferPointer<IORegion>, memory: IOMemory?) throws(DMIOError) {
    switch operation {
    case .read:
        guard regions.count == 1 else { throw .invalidRegionCount(operation: operation, count: regions.count) }
    default:
        guard (1...maxRegions).contains(regions.count) else {
            throw .invalidRegionCount(operation: operation, count: regions.count)
        }
    }

    var longest: UInt64 = 0
    for index in regions.indices where regions[index].count > 0 || operation == .flush {
        let (sector, count) = (regions[index].sector, regions[index].count)
        if let refusal = regions.withDevice(at: index, { refusal(of: operation, sector: sector, count: count, by: $0) }) {
            throw refusal
        }
        longest = max(longest, count << sectorShift)
    }

    guard operation.carriesData else { return }
    guard let memory else { throw .memoryMissing(operation: operation) }
    try memory.validate()
    let available = UInt64(memory.byteCount)
    if available < longest {
        throw .memoryTooSmall(neededBytes: longest, availableBytes: available)
    }
}

/// Why `device` does not take the operation on `count` sectors from
/// `sector`, if it does not: it must take it, and the range lie inside it,
/// aligned to its blocks.
private func refusal(of operation: IOOperation, sector: UInt64, count: UInt64, by device: BlockDevice) -> DMIOError? {
    if operation.writesDevice && device.isReadOnly {
        return .readOnlyDevice(device: device.name, operation: operation)
    }
    guard operation != .flush else { return nil }
    let (end, overflow) = sector.addingReportingOverflow(count)
    guard !overflow, end <= device.sectors else {
        return .beyondEnd(device: device.name, sector: sector, count: count, deviceSectors: device.sectors)
    }
    let block = UInt64(device.blockSize)
    if block > UInt64(sectorSize) && ((sector << sectorShift) % block != 0 || (count << sectorShift) % block != 0) {
        return .misaligned(device: device.name, sector: sector, count: count, blockSize: device.blockSize)
    }
    return nil
}
