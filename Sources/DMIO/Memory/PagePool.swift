import Glibc

/// A pool of page-aligned pages, sized by `get(pages:)` and `put(pages:)`
/// (the kernel's `dm_io_get` / `dm_io_put`).
///
/// `get(pages: n)` says "I will have up to n more pages in flight": the pool
/// allocates them now, so that taking pages later does not allocate.
/// `put(pages: n)` withdraws that and frees pages the pool no longer needs.
///
/// When the pool runs dry, `take` waits until other callers give pages back;
/// it never fails. A single take of more pages than the pool was ever sized
/// for would wait forever, so the pool grows to fit it instead.
public final class PagePool: @unchecked Sendable {
    private let lock = ConditionLock()
    private var free: [UnsafeMutableRawPointer] = []
    private var reserved = 0
    private var allocated = 0

    public init() {}

    deinit {
        for page in free { Glibc.free(page) }
    }

    /// Pages the callers of `get` have asked for, in total.
    public var reservedPages: Int { lock.withLock { reserved } }
    /// Pages that exist now, free or taken.
    public var allocatedPages: Int { lock.withLock { allocated } }
    /// Pages ready to be taken without waiting.
    public var freePages: Int { lock.withLock { free.count } }

    public func get(pages count: Int) {
        precondition(count >= 0, "get(pages:) takes a page count")
        lock.withLock {
            reserved += count
            growLocked(to: reserved)
        }
        lock.broadcast()
    }

    public func put(pages count: Int) {
        precondition(count >= 0, "put(pages:) takes a page count")
        lock.withLock {
            reserved = max(0, reserved - count)
            shrinkLocked()
        }
    }

    /// Takes `count` pages, waiting while the pool has fewer free.
    public func take(_ count: Int) -> PageList {
        lock.lock()
        defer { lock.unlock() }
        if count > allocated { growLocked(to: count) }
        while free.count < count { lock.wait() }
        let pages = Array(free.suffix(count))
        free.removeLast(count)
        return PageList(pages: pages)
    }

    /// Gives pages taken with `take` back to the pool.
    public func give(_ list: PageList) {
        lock.withLock {
            free.append(contentsOf: list.pages)
            shrinkLocked()
        }
        lock.broadcast()
    }

    private func growLocked(to target: Int) {
        guard target > allocated else { return }
        free.reserve(target)
        while allocated < target {
            free.append(allocateAligned(pageSize).baseAddress!)
            allocated += 1
        }
    }

    private func shrinkLocked() {
        while allocated > reserved, let page = free.popLast() {
            Glibc.free(page)
            allocated -= 1
        }
    }
}

extension Array {
    fileprivate mutating func reserve(_ capacity: Int) {
        if self.capacity < capacity { reserveCapacity(capacity) }
    }
}
