/// `unsigned long *error_bits`: bit `i` is set when region `i` of a request
/// failed. A write goes to at most 64 regions, one bit each.
public struct ErrorBits: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// The bit of region `index`.
    public static func region(_ index: Int) -> ErrorBits {
        ErrorBits(rawValue: 1 << UInt64(index))
    }

    /// Whether region `index` failed.
    public func contains(region index: Int) -> Bool {
        rawValue & (1 << UInt64(index)) != 0
    }

    /// The indices of the failed regions, in ascending order.
    public var regions: [Int] {
        (0..<64).filter { contains(region: $0) }
    }

    public var description: String {
        "0x" + String(rawValue, radix: 16)
    }
}

/// Why one region failed: the errno of its first failed I/O.
public struct RegionFailure: Sendable, Hashable, CustomStringConvertible {
    public let region: Int
    public let errno: Int32

    public var description: String {
        "region \(region): \(errnoDescription(errno))"
    }
}

/// The outcome of one dm-io request: the kernel's error bits, and beside them
/// the errno of each failed region, so that a caller can say why.
public struct IOResult: Sendable, Hashable, CustomStringConvertible {
    public let errorBits: ErrorBits
    /// One entry per failed region, ordered by region index.
    public let failures: [RegionFailure]

    // Made each time, not stored: every request ends with one, and on Linux each
    // read of a static made at run time is a call (swift_once); an empty array
    // allocates nothing.
    public static var success: IOResult { IOResult(errorBits: [], failures: []) }

    public var succeeded: Bool { errorBits.isEmpty }

    /// The errno of region `index`, or nil when it succeeded.
    public func errno(ofRegion index: Int) -> Int32? {
        failures.first { $0.region == index }?.errno
    }

    public var description: String {
        succeeded ? "ok" : "error bits \(errorBits): " + failures.map(\.description).joined(separator: ", ")
    }
}
