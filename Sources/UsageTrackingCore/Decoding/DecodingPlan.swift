/// A schema compiled for decoding: which body fields and headers to read, and for every label
/// (all families, flattened) where its value comes from and how it is normalised.
final class DecodingPlan: Sendable {
    enum Input: Sendable, Equatable {
        case body(Int)
        case header(Int)
    }

    /// A class, so walking the labels per callback retains one reference, not each field.
    final class Label: Sendable {
        let input: Input
        let kind: MeteringSchema.Kind
        let required: Bool
        let defaultValue: String
        let hasher: LabelHasher?
        /// Where its problems sort: the source's first place in the schema.
        let rank: Int
        let problemName: String
        /// An earlier label with the same source and treatment, whose value this one reuses.
        let sameAs: Int?

        init(
            input: Input, kind: MeteringSchema.Kind, required: Bool, defaultValue: String, hasher: LabelHasher?, rank: Int,
            problemName: String, sameAs: Int?
        ) {
            self.input = input
            self.kind = kind
            self.required = required
            self.defaultValue = defaultValue
            self.hasher = hasher
            self.rank = rank
            self.problemName = problemName
            self.sameAs = sameAs
        }

        func isPresent(_ fields: ScannedFields, _ headers: [String?]) -> Bool {
            switch self.input {
            case .body(let field): fields.values[field] != nil
            case .header(let index): headers.indices.contains(index) && headers[index] != nil
            }
        }
    }

    struct Value: Sendable {
        let field: Int
        let required: Bool
    }

    let schema: MeteringSchema
    /// Body fields by id, dotted names as written in the schema.
    let fields: [String]
    /// Whether a form may repeat the field to send a list (it feeds a `set` label).
    let listFields: [Bool]
    let bodySourceRank: [Int]
    let headerNames: [String]
    let labels: [Label]
    /// Each family's labels within `labels`.
    let metricLabelRanges: [Range<Int>]
    /// Each family's value source; nil adds 1.
    let values: [Value?]
    let hasValues: Bool
    /// Not counted; logged and shown in /debug, so always read.
    let methodField: Int
    let hostField: Int
    /// Where `Callback.user`, `.groups` and `.path` are taken from, in `labels`.
    let userLabel: Int?
    let groupsLabel: Int?
    let pathLabel: Int?
    let jsonTable: FieldTable
    let formTable: FieldTable
    let routes: RouteTemplates

    init(_ schema: MeteringSchema, hasher: LabelHasher?) {
        var sources: [MeteringSchema.Source] = []
        func rank(_ source: MeteringSchema.Source) -> Int {
            if let index = sources.firstIndex(of: source) { return index }
            sources.append(source)
            return sources.count - 1
        }
        var fields: [String] = []
        var listFields: [Bool] = []
        var bodySourceRank: [Int] = []
        var headerNames: [String] = []
        func body(_ name: String) -> Int {
            let sourceRank = rank(.body(name))
            if let index = fields.firstIndex(of: name) { return index }
            fields.append(name)
            listFields.append(false)
            bodySourceRank.append(sourceRank)
            return fields.count - 1
        }
        func header(_ name: String) -> Int {
            _ = rank(.header(name.lowercased()))
            if let index = headerNames.firstIndex(of: name.lowercased()) { return index }
            headerNames.append(name.lowercased())
            return headerNames.count - 1
        }

        var labels: [Label] = []
        var ranges: [Range<Int>] = []
        var values: [Value?] = []
        var userLabel: Int?, groupsLabel: Int?, pathLabel: Int?
        for metric in schema.metrics {
            let start = labels.count
            for label in metric.labels {
                let input: Input
                switch label.source {
                case .body(let name):
                    input = .body(body(name))
                    if label.kind == .set, case .body(let field) = input { listFields[field] = true }
                case .header(let name): input = .header(header(name))
                }
                let source: MeteringSchema.Source = if case .header(let name) = label.source { .header(name.lowercased()) } else { label.source }
                let sameAs = labels.firstIndex {
                    $0.input == input && $0.kind == label.kind && $0.required == label.required
                        && $0.defaultValue == label.defaultValue && ($0.hasher == nil) == (label.hash == nil)
                }
                switch label.name {
                case "user" where userLabel == nil: userLabel = labels.count
                case "groups" where groupsLabel == nil: groupsLabel = labels.count
                case "path" where pathLabel == nil: pathLabel = labels.count
                default: break
                }
                labels.append(Label(
                    input: input, kind: label.kind, required: label.required, defaultValue: label.defaultValue,
                    hasher: label.hash == nil ? nil : hasher, rank: rank(source), problemName: label.source.problemName,
                    sameAs: sameAs.flatMap { labels[$0].sameAs ?? $0 }
                ))
            }
            ranges.append(start..<labels.count)
            values.append(metric.value.map { Value(field: body($0.from), required: $0.required) })
        }
        self.schema = schema
        self.methodField = body("method")
        self.hostField = body("host")
        self.fields = fields
        self.listFields = listFields
        self.bodySourceRank = bodySourceRank
        self.headerNames = headerNames
        self.labels = labels
        self.metricLabelRanges = ranges
        self.values = values
        self.hasValues = values.contains { $0 != nil }
        self.userLabel = userLabel
        self.groupsLabel = groupsLabel
        self.pathLabel = pathLabel
        self.jsonTable = FieldTable(fields: fields)
        self.formTable = FieldTable.flat(fields)
        self.routes = RouteTemplates(RouteTemplates.builtIn + schema.routes)
    }

    /// The names the body used, for the debug view: wanted ones in schema order, then the rest.
    func fieldNames(_ scanned: ScannedFields) -> [String] {
        let table = scanned.mergesRepeats ? self.formTable : self.jsonTable
        var names: [String] = []
        for (index, entry) in table.entries.enumerated() {
            let present = entry.field.map { scanned.values[$0] != nil } ?? false
            if present || scanned.enteredBranches.contains(index) {
                names.append(String(decoding: entry.name, as: UTF8.self))
            }
        }
        return names + scanned.unknownNames
    }
}
