import DMIO
import Foundation
import Testing

/// `get(pages:)` and `put(pages:)` size the pool; a dry pool waits.
@Suite struct PagePoolTests {
    @Test func getAndPutSizeThePool() throws {
        let client = try client(.threads)
        #expect(client.pool.allocatedPages == 64, "the fixture's client starts with 64 pages")
        client.put(pages: 64)
        client.get(pages: 16)
        #expect(client.pool.allocatedPages == 16)
        #expect(client.pool.freePages == 16)
        client.get(pages: 8)
        #expect(client.pool.allocatedPages == 24)
        client.put(pages: 8)
        #expect(client.pool.allocatedPages == 16)

        let pages = client.allocatePages(10)
        #expect(pages.pages.count == 10)
        #expect(pages.pages.allSatisfy { Int(bitPattern: $0) % pageSize == 0 }, "page-aligned")
        #expect(client.pool.freePages == 6)
        client.put(pages: 16)
        #expect(client.pool.allocatedPages == 10, "pages in use stay until they come back")
        client.release(pages)
        #expect(client.pool.allocatedPages == 0)
    }

    @Test func aDryPoolWaitsUntilPagesComeBack() throws {
        let pool = PagePool()
        pool.get(pages: 4)
        let held = pool.take(4)
        let taken = CompletionCounter()
        Thread.detachNewThread {
            let list = pool.take(2)
            taken.record(.success)
            pool.give(list)
        }
        usleep(100_000)
        #expect(taken.waitFor(0).isEmpty, "the taker waits while the pool is dry")
        pool.give(held)
        #expect(taken.waitFor(1).count == 1, "and gets its pages once they are back")
    }

    @Test func aTakeLargerThanThePoolGrowsIt() {
        let pool = PagePool()
        pool.get(pages: 2)
        let list = pool.take(5)
        #expect(list.pages.count == 5)
        pool.give(list)
        #expect(pool.allocatedPages == 2)
    }
}
