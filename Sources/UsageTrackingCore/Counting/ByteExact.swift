import Glibc

/// Comparisons of label values by their UTF-8 bytes.
///
/// `String`'s `==`, `<` and hashing follow Unicode canonical equivalence, so the Kelvin sign and
/// `K`, or NFC and NFD `café`, would be one label value. Prometheus compares label values by
/// bytes, so everything that decides whether two values are the same series (or orders them)
/// goes through these instead.
extension String {
    /// Whether both strings hold the same UTF-8 bytes.
    public func hasSameBytes(as other: String) -> Bool {
        let a = self.utf8, b = other.utf8
        guard a.count == b.count else { return false }
        // Native strings are contiguous (small ones are copied to the stack), so this is a memcmp.
        let compared = a.withContiguousStorageIfAvailable { x in
            b.withContiguousStorageIfAvailable { y in x.isEmpty || memcmp(x.baseAddress!, y.baseAddress!, x.count) == 0 }
        }
        if let compared, let compared { return compared }
        return a.elementsEqual(b)
    }

    /// Orders by UTF-8 bytes (which is also Unicode scalar order): negative when `self` comes
    /// first, zero when the bytes are the same. Three-way, so sorting label lists compares each
    /// pair of values once.
    @inline(__always)
    func compareBytes(_ other: String) -> Int {
        let a = self.utf8, b = other.utf8
        let compared = a.withContiguousStorageIfAvailable { x in
            b.withContiguousStorageIfAvailable { y in
                let common = min(x.count, y.count)
                let order = common == 0 ? 0 : Int(memcmp(x.baseAddress!, y.baseAddress!, common))
                return order != 0 ? order : x.count - y.count
            }
        }
        if let compared, let compared { return compared }
        if a.elementsEqual(b) { return 0 }
        return a.lexicographicallyPrecedes(b) ? -1 : 1
    }

    /// Whether every byte is ASCII. For two ASCII strings `String`'s own `<` is byte order, and
    /// it compares small ones without touching memory, so sorting takes that path where it can.
    var isASCII: Bool {
        self.utf8.withContiguousStorageIfAvailable { $0.allSatisfy { $0 < 0x80 } } ?? self.utf8.allSatisfy { $0 < 0x80 }
    }

    /// Feeds the UTF-8 bytes, then their count, so that `["ab", ""]` and `["a", "b"]` differ.
    func hashBytes(into hasher: inout Hasher) {
        let hashed: Void? = self.utf8.withContiguousStorageIfAvailable { hasher.combine(bytes: UnsafeRawBufferPointer($0)) }
        if hashed == nil {
            // Same bytes in one buffer, so the hash is the one a contiguous string gets.
            Array(self.utf8).withUnsafeBytes { hasher.combine(bytes: $0) }
        }
        hasher.combine(self.utf8.count)
    }
}

/// Whether `a` sorts before `b`, value by value, each compared by bytes.
@inline(__always)
func labelValuesPrecede(_ a: [String], _ b: [String]) -> Bool {
    for index in 0..<min(a.count, b.count) {
        let order = a[index].compareBytes(b[index])
        if order != 0 { return order < 0 }
    }
    return a.count < b.count
}
