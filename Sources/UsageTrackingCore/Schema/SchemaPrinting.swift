/// The schema as YAML that `MeteringSchema.parse` reads back to the same schema: every setting
/// explicit (defaults included), strings double-quoted with JSON escapes, which YAML reads as is.
extension MeteringSchema {
    public var yaml: String {
        var out = "# The effective metering config; `usage-tracking --config FILE` with this text behaves the same.\n"
        out += "metrics:\n"
        Self.write(self.metrics, to: &out)
        out += "# Counted from model answers through Envoy's External Processing filter (--ext-proc-port):\n"
        if self.tokens.isEmpty {
            out += "tokens: []\n"
        } else {
            out += "tokens:\n"
            Self.write(self.tokens, to: &out)
        }
        out += "# Routes built in for labels of kind route (always on; `routes:` adds to them):\n"
        for template in RouteTemplates.builtIn { out += "#   \(template)\n" }
        if self.routes.isEmpty {
            out += "routes: []\n"
        } else {
            out += "routes:\n"
            for route in self.routes { out += "  - \(Self.quoted(route))\n" }
        }
        return out
    }

    private static func write(_ metrics: [Metric], to out: inout String) {
        for metric in metrics {
            out += "  - name: \(Self.quoted(metric.name))\n"
            out += "    help: \(Self.quoted(metric.help))\n"
            out += "    max_series: \(metric.maxSeries)\n"
            if let value = metric.value {
                out += "    value: {from: \(Self.quoted(value.from)), required: \(value.required)}\n"
            }
            out += "    labels:\n"
            for label in metric.labels {
                out += "      - name: \(Self.quoted(label.name))\n"
                switch label.source {
                case .body(let field): out += "        from: \(Self.quoted(field))\n"
                case .header(let header): out += "        header: \(Self.quoted(header))\n"
                }
                out += "        kind: \(label.kind.rawValue)\n"
                out += "        required: \(label.required)\n"
                if !label.defaultValue.isEmpty { out += "        default: \(Self.quoted(label.defaultValue))\n" }
                out += "        max_values: \(label.maxValues)\n"
                if let hash = label.hash { out += "        hash: \(hash.rawValue)\n" }
            }
        }
    }

    /// A YAML double-quoted scalar. Controls, and the characters YAML takes as line breaks or
    /// a byte-order mark, are escaped so the text reads back byte for byte.
    static func quoted(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20 || (0x7F...0x9F).contains(scalar.value) || scalar.value == 0x2028 || scalar.value == 0x2029 || scalar.value == 0xFEFF:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}
