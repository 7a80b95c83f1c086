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
    for region in regions where region.count > 0 || operation == .flush {
        let device = region.device
        if operation.writesDevice && device.isReadOnly {
            throw .readOnlyDevice(device: device.name, operation: operation)
        }
        guard operation != .flush else { continue }
        let (end, overflow) = region.sector.addingReportingOverflow(region.count)
        guard !overflow, end <= device.sectors else {
            throw .beyondEnd(device: device.name, sector: region.sector, count: region.count,
                             deviceSectors: device.sectors)
        }
        let block = UInt64(device.blockSize)
        if block > UInt64(sectorSize) && (region.byteOffset % block != 0 || region.byteCount % block != 0) {
            throw .misaligned(device: device.name, sector: region.sector, count: region.count,
                              blockSize: device.blockSize)
        }
        longest = max(longest, region.byteCount)
    }

    guard operation.carriesData else { return }
    guard let memory else { throw .memoryMissing(operation: operation) }
    try memory.validate()
    let available = UInt64(memory.byteCount)
    if available < longest {
        throw .memoryTooSmall(neededBytes: longest, availableBytes: available)
    }
}
