/// Every rule a request must meet, checked before any I/O is issued, so
/// that a refused request writes nothing to any region.
func validate(_ operation: IOOperation, regions: [IORegion], memory: IOMemory?) throws(DMIOError) {
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
        try regions[index].validate(operation)
        longest = max(longest, regions[index].byteCount)
    }

    guard operation.carriesData else { return }
    guard let memory else { throw .memoryMissing(operation: operation) }
    try memory.validate()
    let available = UInt64(memory.byteCount)
    if available < longest {
        throw .memoryTooSmall(neededBytes: longest, availableBytes: available)
    }
}

extension IORegion {
    /// The rules of one region: its device takes the operation, and the
    /// region lies inside it, aligned to its blocks.
    fileprivate func validate(_ operation: IOOperation) throws(DMIOError) {
        if operation.writesDevice && device.isReadOnly {
            throw .readOnlyDevice(device: device.name, operation: operation)
        }
        guard operation != .flush else { return }
        let (end, overflow) = sector.addingReportingOverflow(count)
        guard !overflow, end <= device.sectors else {
            throw .beyondEnd(device: device.name, sector: sector, count: count, deviceSectors: device.sectors)
        }
        let block = UInt64(device.blockSize)
        if block > UInt64(sectorSize) && (byteOffset % block != 0 || byteCount % block != 0) {
            throw .misaligned(device: device.name, sector: sector, count: count, blockSize: device.blockSize)
        }
    }
}
