/// A series' labels as the ledger stores them: a JSON object of label name to value, in the
/// family's label order, so `sqlite3` can read them with `json_extract(labels, '$.user')`.
/// The same labels always give the same text (the `series` table's key), and the reader gives
/// back exactly the bytes `encode` was given.
enum LabelsJSON {
    static func encode(_ values: LabelValues, names: [String]) -> String {
        JSONText.object(zip(names, values).map { ($0, JSONText.string($1)) }).serialized
    }

    /// Reads the labels of one family, through the callback scanner (strict JSON).
    struct Reader {
        let names: [String]
        private let table: FieldTable

        init(names: [String]) {
            self.names = names
            self.table = FieldTable(fields: names)
        }

        /// The values of `names`, in order; nil when the text is not a JSON object holding each
        /// of them once, as a string of valid UTF-8.
        func decode(_ text: String) -> LabelValues? {
            var bytes = Array(text.utf8)
            return ScannedFields.withEmpty(fieldCount: self.names.count, listFields: self.names.map { _ in false }, mergesRepeats: false) { fields in
                let scanned = bytes.withUnsafeMutableBytes { buffer in
                    Result { () throws(JSONObjectScanner.SyntaxError) in
                        try JSONObjectScanner.scan(UnsafeRawBufferPointer(buffer), table: self.table, into: &fields)
                    }
                }
                guard case .success = scanned, fields.repeated.isEmpty else { return nil }
                var values: LabelValues = []
                values.reserveCapacity(self.names.count)
                for value in fields.values {
                    guard case .text(let text?)? = value else { return nil }
                    values.append(text)
                }
                return values
            }
        }
    }
}
