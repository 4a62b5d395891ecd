/// Text going into the status page's HTML. Everything the page shows that did not come from the
/// page's own source passes through `escaped`, in text and in quoted attribute values alike, so a
/// user named `<img src=x onerror=alert(1)>` is shown as those characters and makes no element.
public enum HTMLText {
    /// `&`, `<`, `>`, `"` and `'` as character references: enough for element text and for
    /// attribute values in either kind of quotes, which is everywhere the page puts data.
    public static func escaped(_ text: some StringProtocol) -> String {
        var out = ""
        self.append(text, to: &out)
        return out
    }

    public static func append(_ text: some StringProtocol, to out: inout String) {
        // Most values need no escaping; those are appended whole.
        guard text.utf8.contains(where: { Self.needsEscape($0) }) else {
            out += text
            return
        }
        out.reserveCapacity(out.utf8.count + text.utf8.count + 16)
        for scalar in text.unicodeScalars {
            switch scalar {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.unicodeScalars.append(scalar)
            }
        }
    }

    private static func needsEscape(_ byte: UInt8) -> Bool {
        byte == UInt8(ascii: "&") || byte == UInt8(ascii: "<") || byte == UInt8(ascii: ">") || byte == UInt8(ascii: "\"")
            || byte == UInt8(ascii: "'")
    }

    /// A value for a query string (`/?user=…`): every byte but unreserved ASCII percent-encoded,
    /// so the link carries exactly the bytes of the value (then HTML-escaped like any attribute).
    public static func queryComponent(_ text: some StringProtocol) -> String {
        var out = ""
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                out.unicodeScalars.append(Unicode.Scalar(byte))
            default:
                let hex = Array("0123456789ABCDEF".utf8)
                out += "%"
                out.unicodeScalars.append(Unicode.Scalar(hex[Int(byte >> 4)]))
                out.unicodeScalars.append(Unicode.Scalar(hex[Int(byte & 0xF)]))
            }
        }
        return out
    }

    /// The value of `name` in a query string (`a=1&user=b%20c`), percent-decoded with `+` as a
    /// space, as a browser's form sends it. nil when absent, not valid percent-encoding, or not
    /// valid UTF-8.
    public static func queryValue(_ name: String, in query: Substring) -> String? {
        for pair in query.utf8.split(separator: UInt8(ascii: "&"), omittingEmptySubsequences: true) {
            let equals = pair.firstIndex(of: UInt8(ascii: "=")) ?? pair.endIndex
            guard let key = try? FormScanner.percentDecoded(pair[pair.startIndex..<equals]).get(), key == Array(name.utf8) else { continue }
            let raw = equals < pair.endIndex ? pair[pair.index(after: equals)...] : pair[pair.endIndex...]
            return (try? FormScanner.percentDecoded(raw).get()).flatMap { String(validating: $0, as: UTF8.self) }
        }
        return nil
    }
}
