import Foundation
import TestSupport

/// One sample of the metrics text: its name, labels and value.
struct Sample: Decodable {
    let name: String
    let labels: [String: String]
    let value: Double
}

/// `serve --metrics` as a monitoring system reads it (curl, then Debian's
/// python3-prometheus-client, a real parser): samples by name, filtered by
/// labels, and each family's type.
struct Scraped: Decodable {
    let samples: [Sample]
    let families: [String: String]

    func values(_ name: String, _ labels: [String: String] = [:]) -> [Double] {
        samples.filter { sample in
            sample.name == name && labels.allSatisfy { key, value in sample.labels[key] == value }
        }.map(\.value)
    }

    func value(_ name: String, _ labels: [String: String] = [:]) -> Double? {
        let found = values(name, labels)
        return found.count == 1 ? found[0] : nil
    }

    private static let parser = """
        import json, sys
        from prometheus_client.parser import text_string_to_metric_families
        samples, families = [], {}
        for family in text_string_to_metric_families(sys.stdin.read()):
            families[family.name] = family.type
            for sample in family.samples:
                samples.append({"name": sample.name, "labels": sample.labels, "value": sample.value})
        print(json.dumps({"samples": samples, "families": families}))
        """

    /// GET /metrics on the unix socket `path`, parsed.
    static func read(_ path: String) throws -> Scraped {
        let text = try run(["curl", "--silent", "--show-error", "--fail", "--unix-socket", path, "http://localhost/metrics"])
        // A file of its own: suites that scrape run at once.
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("metrics-\(UUID().uuidString).txt").path
        try text.write(toFile: file, atomically: true, encoding: .utf8)
        defer { unlink(file) }
        let json = try run(["bash", "-c", "/usr/bin/python3 -c \"$0\" < \(file)", parser])
        return try JSONDecoder().decode(Scraped.self, from: Data(json.utf8))
    }
}
