import BlockTargets
import DMIO
import Foundation
import LibNBD
import Logging
@testable import NBD
import TestSupport
import Testing

/// An in-process NBD server over a sparse file, on a unix socket.
final class TestServer: @unchecked Sendable {
    let folder: String
    let legPath: String
    let socket: String
    let server: NBDServer
    let device: BlockDevice
    let client: DMIOClient

    var uri: String { "nbd+unix:///?socket=\(socket)" }

    /// `size` bytes of leg, served under `name`.
    init(size: Int = 64 << 20, name: String = "", description: String? = "test leg", readOnly: Bool = false,
         engine: IOEngineKind = .ioUring) async throws {
        var template = Array("/tmp/nbd-test-XXXXXX".utf8CString)
        folder = String(cString: mkdtemp(&template)!)
        legPath = folder + "/leg"
        socket = folder + "/nbd.sock"
        client = try DMIOClient(engine: .only(engine))
        device = try BlockDevice.open(legPath, options: DeviceOptions(createSize: UInt64(size)))
        var logger = Logger(label: "nbd-test")
        logger.logLevel = .critical
        server = NBDServer(
            exports: [Export(name: name, description: description, readOnly: readOnly,
                             target: LinearTarget(device: device, client: client))],
            threads: 2, logger: logger)
        try await server.listen(on: .unix(path: socket))
    }

    /// A libnbd handle connected to the export (or set up by `prepare` first).
    func connect(exportName: String = "", _ prepare: (NBDHandle) throws -> Void = { _ in }) throws -> NBDHandle {
        let handle = try NBDHandle()
        try handle.setExportName(exportName)
        try prepare(handle)
        try handle.connect(unixSocket: socket, exportName: exportName)
        return handle
    }

    func stop() async {
        await server.shutdown()
        try? FileManager.default.removeItem(atPath: folder)
    }
}

/// Runs `body` against a fresh server, and stops the server after.
func withServer(size: Int = 64 << 20, name: String = "", readOnly: Bool = false,
                _ body: (TestServer) async throws -> Void) async throws {
    let server = try await TestServer(size: size, name: name, readOnly: readOnly)
    do {
        try await body(server)
    } catch {
        await server.stop()
        throw error
    }
    await server.stop()
}

/// Expects `body` to fail with the errno libnbd reports for the server's reply.
func expectNBDError(_ errno: Int32, _ body: () throws -> Void, sourceLocation: SourceLocation = #_sourceLocation) {
    do {
        try body()
        Issue.record("expected errno \(errno), the call succeeded", sourceLocation: sourceLocation)
    } catch let error as NBDError {
        #expect(error.errno == errno, "\(error.message)", sourceLocation: sourceLocation)
    } catch {
        Issue.record("unexpected \(error)", sourceLocation: sourceLocation)
    }
}
