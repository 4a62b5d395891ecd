/// A series' labels as the ledger stores them: a JSON object of label name to value, in the
/// family's label order, so `sqlite3` can read them with `json_extract(labels, '$.user')`.
/// The same labels always give the same text (the `series` table's key), and `decode` reads back
/// exactly what `encode` wrote, byte for byte.
enum LabelsJSON {
    static func encode(_ values: LabelValues, names: [String]) -> String {
        JSONText.object(zip(names, values).map { ($0, JSONText.string($1)) }).serialized
    }

    /// The values of `names`, in order; nil for any text `encode` would not have written (other
    /// names, another order, other spacing or escapes), so a row that does not read back exactly
    /// is reported rather than restored under different labels.
    static func decode(_ text: String, names: [String]) -> LabelValues? {
        var fields = ScannedFields(fieldCount: names.count, listFields: names.map { _ in false }, mergesRepeats: false)
        var bytes = Array(text.utf8)
        let scanned = bytes.withUnsafeMutableBytes { buffer in
            Result { () throws(JSONObjectScanner.SyntaxError) in
                try JSONObjectScanner.scan(UnsafeRawBufferPointer(buffer), table: FieldTable(fields: names), into: &fields)
            }
        }
        guard case .success = scanned else { return nil }
        var values: LabelValues = []
        for value in fields.values {
            guard case .text(let text?)? = value else { return nil }
            values.append(text)
        }
        return Self.encode(values, names: names) == text ? values : nil
    }
}
