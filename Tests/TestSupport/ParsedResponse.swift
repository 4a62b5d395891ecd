/// An HTTP/1.1 response parsed from raw bytes, for tests that check replies byte for byte.
public struct ParsedResponse: Sendable {
    public var status: Int
    public var headers: [(String, String)]
    public var body: [UInt8]

    public var text: String { String(decoding: self.body, as: UTF8.self) }
    public func header(_ name: String) -> String? { self.headers.first { $0.0 == name.lowercased() }?.1 }

    /// Every complete response in `bytes`, in order. Header names are lower-cased.
    /// A response whose body has not fully arrived (or a reply to HEAD) gets an empty body.
    public static func parseAll(_ bytes: [UInt8]) -> [ParsedResponse] {
        var responses: [ParsedResponse] = []
        var rest = bytes[...]
        let separator: [UInt8] = Array("\r\n\r\n".utf8)
        while let headEnd = rest.firstRange(of: separator) {
            let lines = String(decoding: rest[rest.startIndex..<headEnd.lowerBound], as: UTF8.self)
                .split(separator: "\r\n", omittingEmptySubsequences: false)
            let status = Int(lines[0].split(separator: " ")[1])!
            let headers = lines.dropFirst().map { line -> (String, String) in
                let colon = line.firstIndex(of: ":")!
                return (line[..<colon].lowercased(), String(line[line.index(after: colon)...].drop { $0 == " " }))
            }
            let length = headers.first { $0.0 == "content-length" }.flatMap { Int($0.1) } ?? 0
            let bodyStart = headEnd.upperBound
            let hasBody = rest[bodyStart...].count >= length
            let body = hasBody ? Array(rest[bodyStart..<bodyStart + length]) : []
            responses.append(ParsedResponse(status: status, headers: headers, body: body))
            rest = rest[(hasBody ? bodyStart + length : bodyStart)...]
        }
        return responses
    }
}
