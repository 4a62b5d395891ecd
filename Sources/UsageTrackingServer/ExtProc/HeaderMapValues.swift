import EnvoyExternalProcessing

extension Envoy_Config_Core_V3_HeaderMap {
    /// The values of the headers `names` (lower case, as Envoy sends them), in their order, nil
    /// where absent; `problem` names the first one given twice, over `maxBytes` or not UTF-8.
    /// A value is `raw_value`'s bytes, or `value` when that is empty (Envoy before raw_value).
    /// `:path` is cut at its query or fragment first, as the callback's `path` is.
    func values(of names: [String], maxBytes: Int) -> (values: [String?], problem: String?) {
        var values = [String?](repeating: nil, count: names.count)
        var seen = [Bool](repeating: false, count: names.count)
        for header in self.headers {
            guard let index = names.firstIndex(of: header.key) else { continue }
            guard !seen[index] else { return (values, "\(header.key): given more than once") }
            seen[index] = true
            switch Self.text(header.bytes, name: header.key, maxBytes: maxBytes) {
            case .success(let value): values[index] = value
            case .failure(let problem): return (values, problem.description)
            }
        }
        return (values, nil)
    }

    /// The bytes of the first header `name`, whatever their length or encoding; nil when absent.
    func firstValue(of name: String) -> [UInt8]? {
        self.headers.first { $0.key == name }?.bytes
    }

    private static func text<Bytes: Collection<UInt8>>(_ bytes: Bytes, name: String, maxBytes: Int) -> Result<String, HeaderProblem> {
        let kept = name == ":path" ? bytes.prefix { $0 != UInt8(ascii: "?") && $0 != UInt8(ascii: "#") } : bytes[...]
        guard kept.count <= maxBytes else { return .failure(HeaderProblem(description: "\(name): \(kept.count) bytes; the limit is \(maxBytes)")) }
        guard let text = String(validating: kept, as: UTF8.self) else { return .failure(HeaderProblem(description: "\(name): not valid UTF-8")) }
        return .success(text)
    }
}

extension Envoy_Config_Core_V3_HeaderValue {
    fileprivate var bytes: [UInt8] {
        self.rawValue.isEmpty ? Array(self.value.utf8) : Array(self.rawValue)
    }
}

private struct HeaderProblem: Error, CustomStringConvertible {
    var description: String
}
