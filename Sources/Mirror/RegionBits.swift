/// One bit per region, in words: the write-intent bitmap in memory, and the
/// regions the region hash saw written lately. A bit costs every write a
/// shift where a set of regions cost it a hash; the hash's two (this tick,
/// the last) take twice the bitmap's memory, whatever was written.
struct RegionBits {
    private var words: [UInt64]

    init(count: Int) {
        words = [UInt64](repeating: 0, count: (count + 63) / 64)
    }

    subscript(region: Int) -> Bool {
        get { words[region / 64] & Self.mask(region) != 0 }
        set {
            if newValue { words[region / 64] |= Self.mask(region) } else { words[region / 64] &= ~Self.mask(region) }
        }
    }

    var setCount: Int { words.reduce(0) { $0 + $1.nonzeroBitCount } }

    mutating func clearAll() {
        words.withUnsafeMutableBufferPointer { $0.update(repeating: 0) }
    }

    private static func mask(_ region: Int) -> UInt64 { 1 << UInt64(region % 64) }
}
