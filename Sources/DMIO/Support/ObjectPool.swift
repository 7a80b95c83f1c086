import Synchronization

/// A lock-protected free list of reusable objects that keeps every object it
/// made for as long as it lives. So an object in use may be referenced
/// unowned: the I/O path then pays no reference counting for it (a bio
/// names its request and device, a batch links its bios), and whoever uses
/// the objects keeps the pool alive meanwhile (a request in flight holds
/// its client's pools).
final class ObjectPool<Object: AnyObject>: @unchecked Sendable {
    private struct Kept {
        var free: [Unmanaged<Object>] = []
        var made: [Object] = []
    }

    /// A futex word, locked inline: every request takes and returns
    /// objects, several times, where a pthread mutex costs a call each way.
    private let kept = Mutex(Kept())
    private let make: () -> Object

    init(make: @escaping () -> Object) {
        self.make = make
        kept.withLock { $0.free.reserveCapacity(256) }
    }

    /// An object to use; the pool keeps it meanwhile.
    func take() -> Unmanaged<Object> {
        kept.withLock { kept in kept.free.popLast() ?? makeKept(&kept) }
    }

    func recycle(_ object: Object) {
        kept.withLock { $0.free.append(Unmanaged.passUnretained(object)) }
    }

    /// Creates objects up front, so that `count` can be in flight before the
    /// pool allocates.
    func prefill(_ count: Int) {
        kept.withLock { kept in
            while kept.free.count < count { kept.free.append(makeKept(&kept)) }
        }
    }

    private func makeKept(_ kept: inout Kept) -> Unmanaged<Object> {
        let object = make()
        kept.made.append(object)
        return Unmanaged.passUnretained(object)
    }
}
