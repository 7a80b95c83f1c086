import CDMIOSupport

/// fallocate(2) modes and pwritev2(2) flags the I/O paths use.
enum Linux {
    /// Deallocate the range; the file keeps its size and reads zeroes there.
    static let punchHole = Int32(DMIO_FALLOC_FL_PUNCH_HOLE | DMIO_FALLOC_FL_KEEP_SIZE)
    /// Zero the range and keep it allocated.
    static let zeroRange = Int32(DMIO_FALLOC_FL_ZERO_RANGE | DMIO_FALLOC_FL_KEEP_SIZE)
    /// Per-write O_DSYNC: what a FUA write becomes.
    static let writeDataSync = Int32(DMIO_RWF_DSYNC)
}
