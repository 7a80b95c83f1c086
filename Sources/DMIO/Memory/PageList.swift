/// The size of one page of the pool, and of one entry of a `PageList`.
public let pageSize = 4096

/// `struct page_list`: a list of whole pages, each `pageSize` bytes and
/// page-aligned. Requests take it together with an offset into its first
/// page, and run through the pages in order.
///
/// Take page lists from `DMIOClient.allocatePages(_:)` and hand them back
/// with `DMIOClient.release(_:)`, or build one over pages of your own.
public struct PageList: @unchecked Sendable {
    public let pages: [UnsafeMutableRawPointer]

    public init(pages: [UnsafeMutableRawPointer]) {
        self.pages = pages
    }

    /// The bytes the list holds from `offset` in its first page onwards.
    public func byteCount(from offset: Int) -> Int {
        pages.count * pageSize - offset
    }
}

/// `struct bio_vec`: `length` bytes at `offset` from `page`. An array of bio
/// vectors is one request's memory, consumed in order; several requests
/// given different slices of one array send different parts of one buffer
/// to different devices.
public struct BioVec: @unchecked Sendable {
    public var page: UnsafeMutableRawPointer
    public var offset: Int
    public var length: Int

    public init(page: UnsafeMutableRawPointer, offset: Int, length: Int) {
        self.page = page
        self.offset = offset
        self.length = length
    }
}
