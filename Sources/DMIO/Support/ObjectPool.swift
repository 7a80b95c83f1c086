/// A lock-protected free list of reusable objects.
final class ObjectPool<Object: AnyObject>: @unchecked Sendable {
    private let lock = ConditionLock()
    private var free: [Object] = []
    private let make: () -> Object

    init(make: @escaping () -> Object) {
        self.make = make
        free.reserveCapacity(256)
    }

    func take() -> Object {
        lock.lock()
        if let object = free.popLast() {
            lock.unlock()
            return object
        }
        lock.unlock()
        return make()
    }

    func recycle(_ object: Object) {
        lock.withLock { free.append(object) }
    }

    /// Creates objects up front, so that `count` can be in flight before the
    /// pool allocates.
    func prefill(_ count: Int) {
        lock.withLock {
            while free.count < count { free.append(make()) }
        }
    }
}
