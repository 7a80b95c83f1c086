import Glibc

/// The thread-driven client of each thread (`DMIOClient.current`). The
/// thread holds a reference to it until the thread exits or makes another.
enum CurrentClient {
    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        let rc = pthread_key_create(&key) { client in
            Unmanaged<DMIOClient>.fromOpaque(client!).release()
        }
        precondition(rc == 0, "pthread_key_create")
        return key
    }()

    static func set(_ client: DMIOClient) {
        if let previous = pthread_getspecific(key) {
            Unmanaged<DMIOClient>.fromOpaque(previous).release()
        }
        pthread_setspecific(key, Unmanaged.passRetained(client).toOpaque())
    }

    static func get() -> DMIOClient? {
        pthread_getspecific(key).map { Unmanaged<DMIOClient>.fromOpaque($0).takeUnretainedValue() }
    }
}
