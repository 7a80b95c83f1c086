/// One histogram metric family in the Prometheus text format: a series per
/// label set, each with cumulative `_bucket` lines up to `le="+Inf"`, then
/// `_sum` and `_count`. Buckets come counted apart (the statistics' own
/// buckets) and are summed up here.
struct HistogramFamily {
    let name: String
    let help: String
    /// Each bucket's upper bound; the last is +Inf.
    let bounds: [Double]
    private var series: [(labels: [(String, String)], buckets: [UInt64], sum: Double)] = []

    init(name: String, help: String, bounds: [Double]) {
        precondition(bounds.last == .infinity, "a histogram's last bucket is +Inf")
        self.name = name
        self.help = help
        self.bounds = bounds
    }

    mutating func add(_ labels: [(String, String)], buckets: [UInt64], sum: Double) {
        precondition(buckets.count == bounds.count)
        series.append((labels, buckets, sum))
    }

    func write(into text: inout [UInt8]) {
        guard !series.isEmpty else { return }
        text += Array("# HELP \(name) \(help)\n# TYPE \(name) histogram\n".utf8)
        for (labels, buckets, sum) in series {
            let rendered = labels.map { "\($0.0)=\"\(Self.escaped($0.1))\"" }.joined(separator: ",")
            let prefix = rendered.isEmpty ? "" : rendered + ","
            var cumulative: UInt64 = 0
            for (bound, count) in zip(bounds, buckets) {
                cumulative &+= count
                text += Array("\(name)_bucket{\(prefix)le=\"\(Self.format(bound))\"} \(cumulative)\n".utf8)
            }
            let braces = rendered.isEmpty ? "" : "{\(rendered)}"
            text += Array("\(name)_sum\(braces) \(Self.format(sum))\n\(name)_count\(braces) \(cumulative)\n".utf8)
        }
    }

    /// Go's float syntax, which Prometheus reads: "+Inf", "1e-06", "4096".
    static func format(_ value: Double) -> String {
        if value == .infinity { return "+Inf" }
        if value == value.rounded(), abs(value) < 1e15 { return "\(Int64(value))" }
        return "\(value)"
    }

    /// A label value as the text format escapes it.
    static func escaped(_ value: String) -> String {
        var out = ""
        for character in value {
            switch character {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.append(character)
            }
        }
        return out
    }
}
