import DMIO

/// Copies bytes of the mirrored data from one leg to others (dm-kcopyd's
/// job for dm-raid1): one read from the source, one write to every
/// destination, and what failed where. Synchronous: for the mirror's
/// background thread, which may block.
struct Copier {
    /// How a copy went. A source that failed its read wrote nothing.
    struct Outcome {
        var sourceFailure: LegFailure?
        var destinationFailures: [LegFailure] = []
    }

    let client: DMIOClient
    let layout: MirrorLayout

    /// Copies `length` bytes of data at `offset` from `source` to each of
    /// `destinations`, through `buffer` (at least `length` long). Throws when
    /// DMIO refuses the request itself: then no leg is to blame.
    func copy(offset: UInt64, length: UInt64, from source: LegTable.Leg, to destinations: [LegTable.Leg],
              through buffer: UnsafeMutableRawBufferPointer) throws(DMIOError) -> Outcome {
        let memory = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(length)])
        let read = try client.sync(.read, regions: [layout.dataRegion(on: source.device, offset: offset, length: length)],
                                   buffer: memory)
        if let failure = read.failures.first {
            return Outcome(sourceFailure: LegFailure(leg: source, errno: failure.errno))
        }
        let regions = destinations.map { layout.dataRegion(on: $0.device, offset: offset, length: length) }
        let written = try client.sync(.write, regions: regions, buffer: memory)
        return Outcome(destinationFailures: written.legFailures(destinations))
    }
}
