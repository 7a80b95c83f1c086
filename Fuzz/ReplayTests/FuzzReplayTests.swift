import Fuzzing
import Glibc
import Testing

/// Every committed input of every fuzz target, run again: the seed corpus,
/// and each crash `make fuzz` found (kept in Fuzz/Crashes once fixed), so
/// that none comes back.
@Suite struct FuzzReplayTests {
    /// Fuzz/, from this file's place.
    private static let folder = String(#filePath.split(separator: "/", omittingEmptySubsequences: false)
                                            .dropLast(2).joined(separator: "/"))

    @Test(arguments: FuzzInput.allCases)
    func theCorpusAndEveryCrashFoundRunAgain(_ input: FuzzInput) throws {
        let files = FuzzInput.files(in: "\(Self.folder)/Corpus/\(input.rawValue)")
            + FuzzInput.files(in: "\(Self.folder)/Crashes/\(input.rawValue)")
        #expect(!files.isEmpty, "no seed corpus for \(input.rawValue)")
        try input.replay(files)
    }
}
