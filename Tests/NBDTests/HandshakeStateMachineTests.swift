@testable import NBD
import TestSupport
import Testing

/// The handshake's decisions on their own, TLS's rules first (proto.md,
/// "TLS support"): no channel, no bytes.
@Suite struct HandshakeStateMachineTests {
    private let exports = [Export(name: "mem", target: MemoryTarget(size: 1 << 20))]
    private let go = ClientOption.go(.init(name: "mem", requests: []))

    private func errorType(_ action: HandshakeStateMachine.Action) -> OptionReply? {
        guard case .answer(_, .error(let type, _)) = action else { return nil }
        return type
    }

    @Test func underRequireOnlyStartTLSAndAbortAreTakenBeforeTLS() {
        var machine = HandshakeStateMachine(exports: exports, tls: .require)
        for option: ClientOption in [.list, .structuredReply, go, .info(.init(name: "mem", requests: [])),
                                     .listMetaContext(.init(export: "mem", queries: [])), .unknown(code: 99),
                                     .tooBig(code: 7)] {
            #expect(errorType(machine.receive(option)) == .errTLSRequired, "\(option)")
        }
        // Malformed STARTTLS is still STARTTLS: invalid, not "TLS required".
        #expect(errorType(machine.receive(.malformed(code: OptionCode.startTLS.rawValue, why: "data"))) == .errInvalid)
        guard case .startTLS = machine.receive(.startTLS) else { Issue.record("STARTTLS refused"); return }
        guard case .answer(_, .exports(let listed)) = machine.receive(.list) else { Issue.record("LIST refused after TLS"); return }
        #expect(listed.map(\.name) == ["mem"])
        #expect(errorType(machine.receive(.startTLS)) == .errInvalid, "a second STARTTLS")
        guard case .enterTransmission = machine.receive(go) else { Issue.record("GO refused after TLS"); return }
    }

    @Test func exportNameBeforeRequiredTLSClosesTheConnection() {
        var machine = HandshakeStateMachine(exports: exports, tls: .require)
        guard case .close = machine.receive(.exportName("mem")) else { Issue.record("not closed"); return }
        guard case .none = machine.receive(.list) else { Issue.record("answered after the close"); return }
    }

    @Test func abortIsAnsweredUnderRequire() {
        var machine = HandshakeStateMachine(exports: exports, tls: .require)
        guard case .answerAndClose(_, .ack) = machine.receive(.abort) else { Issue.record("ABORT not acknowledged"); return }
    }

    @Test func withoutTLSStartTLSIsAgainstPolicy() {
        var machine = HandshakeStateMachine(exports: exports, tls: .off)
        #expect(errorType(machine.receive(.startTLS)) == .errPolicy)
        guard case .enterTransmission = machine.receive(go) else { Issue.record("GO refused"); return }
    }

    @Test func onLetsPlaintextClientsIn() {
        var machine = HandshakeStateMachine(exports: exports, tls: .on)
        guard case .answer(_, .exports) = machine.receive(.list) else { Issue.record("LIST refused"); return }
        guard case .enterTransmission = machine.receive(go) else { Issue.record("GO refused"); return }
    }

    /// A man in the middle could have sent what came before STARTTLS: none
    /// of it may outlive TLS's start.
    @Test func whatWasNegotiatedBeforeStartTLSIsForgotten() {
        var machine = HandshakeStateMachine(exports: exports, tls: .on)
        _ = machine.receive(.structuredReply)
        guard case .answer(_, .metaContexts(let set, listing: false)) =
                machine.receive(.setMetaContext(.init(export: "mem", queries: [MetaContext.baseAllocation]))),
              set.count == 1 else { Issue.record("base:allocation not set"); return }
        guard case .startTLS = machine.receive(.startTLS) else { Issue.record("STARTTLS refused"); return }
        #expect(errorType(machine.receive(.setMetaContext(.init(export: "mem", queries: [MetaContext.baseAllocation]))))
                == .errInvalid, "structured replies are off again: meta contexts need them first")
        guard case .enterTransmission(let session, _) = machine.receive(go) else { Issue.record("GO refused"); return }
        #expect(!session.structuredReplies)
        #expect(session.metaContexts.isEmpty)
    }

    @Test func unknownClientFlagsClose() {
        var machine = HandshakeStateMachine(exports: exports, tls: .off)
        guard case .close = machine.receive(clientFlags: 0x80) else { Issue.record("not closed"); return }
    }
}
