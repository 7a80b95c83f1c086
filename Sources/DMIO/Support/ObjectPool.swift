/// A lock-protected free list of reusable objects that keeps every object it
/// made for as long as it lives. So an object in use may be referenced
/// unowned: the I/O path then pays no reference counting for it (a bio
/// names its request and device, a batch links its bios), and whoever uses
/// the objects keeps the pool alive meanwhile (a request in flight holds
/// its client's pools).
final class ObjectPool<Object: AnyObject>: @unchecked Sendable {
    private let lock = ConditionLock()
    private var free: [Unmanaged<Object>] = []
    private var made: [Object] = []
    private let make: () -> Object

    init(make: @escaping () -> Object) {
        self.make = make
        free.reserveCapacity(256)
    }

    /// An object to use; the pool keeps it meanwhile.
    func take() -> Unmanaged<Object> {
        lock.lock()
        defer { lock.unlock() }
        return free.popLast() ?? makeKept()
    }

    func recycle(_ object: Object) {
        lock.withLock { free.append(Unmanaged.passUnretained(object)) }
    }

    /// Creates objects up front, so that `count` can be in flight before the
    /// pool allocates.
    func prefill(_ count: Int) {
        lock.withLock {
            while free.count < count { free.append(makeKept()) }
        }
    }

    private func makeKept() -> Unmanaged<Object> {
        let object = make()
        made.append(object)
        return Unmanaged.passUnretained(object)
    }
}
