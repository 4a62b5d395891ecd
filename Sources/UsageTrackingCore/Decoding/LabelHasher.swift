import Crypto

/// `hash: hmac-sha256`: a label's exposed value is the HMAC-SHA256 of its value under the key
/// from `--label-hmac-key-file`, as lowercase hex truncated to 16 characters (64 bits: no
/// collision expected below billions of values, and short enough to read on a dashboard).
public struct LabelHasher: Sendable {
    public static let hexLength = 16
    private let key: SymmetricKey

    public init(key: [UInt8]) {
        precondition(!key.isEmpty, "an empty HMAC key hides nothing")
        self.key = SymmetricKey(data: key)
    }

    public func hash(_ value: String) -> String {
        Self.hex(HMAC<SHA256>.authenticationCode(for: Array(value.utf8), using: self.key), length: Self.hexLength)
    }

    /// The full lowercase hex code, for checking against published vectors.
    public func fullHex(_ value: [UInt8]) -> String {
        Self.hex(HMAC<SHA256>.authenticationCode(for: value, using: self.key), length: 64)
    }

    private static func hex(_ code: HMAC<SHA256>.MAC, length: Int) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(64)
        for byte in code {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 0x0F)])
        }
        return String(decoding: out.prefix(length), as: UTF8.self)
    }

    /// The key as a file holds it: one trailing line break is not part of it.
    public static func key(fromFile contents: [UInt8]) -> [UInt8] {
        var key = contents
        if key.last == UInt8(ascii: "\n") { key.removeLast() }
        if key.last == UInt8(ascii: "\r") { key.removeLast() }
        return key
    }
}
