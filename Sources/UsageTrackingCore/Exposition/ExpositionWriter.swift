/// Writes the Prometheus text exposition format, version 0.0.4, into a byte array.
///
/// Each family is written whole (HELP, TYPE, then its samples) so HELP and TYPE appear once per
/// family; callers pass samples in a stable order.
public struct ExpositionWriter {
    public static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    public enum MetricType: String {
        case counter, gauge, histogram
    }

    public private(set) var bytes: [UInt8] = []

    public init(capacity: Int = 4096) {
        self.bytes.reserveCapacity(capacity)
    }

    public mutating func family(_ name: String, help: String, type: MetricType) {
        self.append("# HELP ")
        self.append(name)
        self.bytes.append(UInt8(ascii: " "))
        self.appendEscaped(help, quotes: false)
        self.append("\n# TYPE ")
        self.append(name)
        self.bytes.append(UInt8(ascii: " "))
        self.append(type.rawValue)
        self.bytes.append(UInt8(ascii: "\n"))
    }

    public mutating func sample(_ name: String, labels: [String] = [], values: [String] = [], value: UInt64) {
        self.sampleName(name, labels: labels, values: values)
        self.appendDecimal(value)
        self.bytes.append(UInt8(ascii: "\n"))
    }

    public mutating func sample(_ name: String, labels: [String] = [], values: [String] = [], value: Double) {
        self.sampleName(name, labels: labels, values: values)
        self.append(Self.format(value))
        self.bytes.append(UInt8(ascii: "\n"))
    }

    /// Go's float syntax, which Prometheus parses: "+Inf", "-Inf", "NaN", or a decimal.
    static func format(_ value: Double) -> String {
        if value.isNaN { return "NaN" }
        if value.isInfinite { return value > 0 ? "+Inf" : "-Inf" }
        if value == value.rounded(), abs(value) < 1e15 { return String(Int64(value)) }
        return "\(value)"
    }

    private mutating func sampleName(_ name: String, labels: [String], values: [String]) {
        self.append(name)
        if !labels.isEmpty {
            self.bytes.append(UInt8(ascii: "{"))
            for index in labels.indices {
                if index > 0 { self.bytes.append(UInt8(ascii: ",")) }
                self.append(labels[index])
                self.append("=\"")
                self.appendEscaped(values[index], quotes: true)
                self.bytes.append(UInt8(ascii: "\""))
            }
            self.bytes.append(UInt8(ascii: "}"))
        }
        self.bytes.append(UInt8(ascii: " "))
    }

    private mutating func append(_ text: String) {
        self.bytes.append(contentsOf: text.utf8)
    }

    /// Label values escape `\`, `"` and newline; HELP text escapes `\` and newline only.
    private mutating func appendEscaped(_ text: String, quotes: Bool) {
        let utf8 = text.utf8
        guard utf8.contains(where: { $0 == UInt8(ascii: "\\") || $0 == UInt8(ascii: "\n") || (quotes && $0 == UInt8(ascii: "\"")) })
        else {
            self.bytes.append(contentsOf: utf8)
            return
        }
        for byte in utf8 {
            switch byte {
            case UInt8(ascii: "\\"): self.append("\\\\")
            case UInt8(ascii: "\n"): self.append("\\n")
            case UInt8(ascii: "\"") where quotes: self.append("\\\"")
            default: self.bytes.append(byte)
            }
        }
    }

    private mutating func appendDecimal(_ value: UInt64) {
        var divisor: UInt64 = 1
        while value / divisor >= 10 { divisor *= 10 }
        while divisor > 0 {
            self.bytes.append(UInt8(ascii: "0") + UInt8(value / divisor % 10))
            divisor /= 10
        }
    }
}
