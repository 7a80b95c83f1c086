import Glibc

/// One object per thread, made on the thread's first use and released when
/// the thread exits.
final class ThreadLocal<Value: AnyObject>: @unchecked Sendable {
    private let key: pthread_key_t
    private let make: () -> Value

    init(_ make: @escaping () -> Value) {
        var key = pthread_key_t()
        precondition(pthread_key_create(&key, { value in
            Unmanaged<AnyObject>.fromOpaque(value!).release()
        }) == 0, "pthread_key_create")
        self.key = key
        self.make = make
    }

    /// This thread's object, made now if it has none.
    var value: Value {
        if let existing { return existing }
        let value = make()
        pthread_setspecific(key, Unmanaged.passRetained(value).toOpaque())
        return value
    }

    /// Runs `body` with this thread's object (made now if it has none),
    /// lent without a reference of its own: the thread keeps it.
    func withValue<Result>(_ body: (Value) -> Result) -> Result {
        guard let raw = pthread_getspecific(key) else { return body(value) }
        return Unmanaged<Value>.fromOpaque(raw)._withUnsafeGuaranteedRef(body)
    }

    /// This thread's object if it has one.
    var existing: Value? {
        pthread_getspecific(key).map { Unmanaged<Value>.fromOpaque($0).takeUnretainedValue() }
    }
}
