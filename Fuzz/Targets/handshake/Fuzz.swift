import Fuzzing

/// libFuzzer's entry (`make fuzz`). Built without FUZZING, the program
/// runs the files it is given instead, as a crash is replayed.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    FuzzInput.handshake.run(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}

#if !FUZZING
@main enum Replay {
    static func main() throws { try FuzzInput.handshake.replay(CommandLine.arguments.dropFirst()) }
}
#endif
