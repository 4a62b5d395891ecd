import Yams

/// Reads a metering config (YAML) strictly: an unknown key, a wrong type, a number out of range,
/// a duplicate or invalid name stops startup with the file, the line and the key at fault.
extension MeteringSchema {
    public struct LoadError: Error, Equatable, CustomStringConvertible {
        public var file: String
        /// 1-based; nil where YAML gives no position (an unreadable file).
        public var line: Int?
        /// Where in the document, e.g. `metrics[0].labels[2].kind`; "" for the whole file.
        public var key: String
        public var problem: String

        public var description: String {
            let place = self.line.map { "\(self.file):\($0)" } ?? self.file
            return self.key.isEmpty ? "\(place): \(self.problem)" : "\(place): \(self.key): \(self.problem)"
        }
    }

    /// Largest config read: far above any real schema, and keeps a mistaken path harmless.
    public static let maximumConfigBytes = 1 << 20

    public static func load(file path: String) throws(LoadError) -> MeteringSchema {
        let bytes: [UInt8]
        switch readFileBytes(path, limit: Self.maximumConfigBytes) {
        case .success(let read): bytes = read
        case .failure(let error): throw LoadError(file: path, line: nil, key: "", problem: "cannot be read: \(error)")
        }
        guard bytes.count <= Self.maximumConfigBytes else {
            throw LoadError(file: path, line: nil, key: "", problem: "is larger than \(Self.maximumConfigBytes) bytes")
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw LoadError(file: path, line: nil, key: "", problem: "is not valid UTF-8")
        }
        return try Self.parse(text, file: path)
    }

    public static func parse(_ text: String, file: String) throws(LoadError) -> MeteringSchema {
        let root: Node?
        do {
            root = try Yams.compose(yaml: text)
        } catch let error as YamlError {
            throw Self.syntaxError(error, file: file)
        } catch {
            throw LoadError(file: file, line: nil, key: "", problem: "is not valid YAML (\(error))")
        }
        guard let root else { throw LoadError(file: file, line: 1, key: "", problem: "is empty; it needs `metrics:`") }
        return try ConfigReader(file: file).schema(root)
    }

    private static func syntaxError(_ error: YamlError, file: String) -> LoadError {
        switch error {
        case .scanner(_, let problem, let mark, _), .parser(_, let problem, let mark, _), .composer(_, let problem, let mark, _):
            LoadError(file: file, line: mark.line, key: "", problem: "is not valid YAML: \(problem)")
        case .duplicatedKeysInMapping(let duplicates, let context):
            // YAML refuses these before the schema is walked, so the key is named without its path.
            LoadError(file: file, line: context.mark.line, key: duplicates.sorted().joined(separator: ", "), problem: "given more than once")
        default:
            LoadError(file: file, line: nil, key: "", problem: "is not valid YAML")
        }
    }
}

/// Walks the YAML nodes, keeping the file name for every error.
private struct ConfigReader {
    let file: String
    typealias LoadError = MeteringSchema.LoadError

    func error(_ node: Node?, _ key: String, _ problem: String) -> LoadError {
        LoadError(file: self.file, line: node?.mark?.line, key: key, problem: problem)
    }

    /// The mapping's entries by key, refusing unknown and repeated keys.
    func mapping(_ node: Node, _ key: String, allowed: [String]) throws(LoadError) -> [String: Node] {
        guard case .mapping(let mapping) = node else { throw self.error(node, key, "must be a mapping, got \(Self.kind(node))") }
        var entries: [String: Node] = [:]
        for (name, value) in mapping {
            let path = key.isEmpty ? (name.string ?? "?") : "\(key).\(name.string ?? "?")"
            guard case .scalar(let scalar) = name, allowed.contains(scalar.string) else {
                throw self.error(name, path, "unknown key; expected one of \(allowed.joined(separator: ", "))")
            }
            guard entries[scalar.string] == nil else { throw self.error(name, path, "given more than once") }
            entries[scalar.string] = value
        }
        return entries
    }

    func sequence(_ node: Node, _ key: String) throws(LoadError) -> [Node] {
        guard case .sequence(let sequence) = node else { throw self.error(node, key, "must be a list, got \(Self.kind(node))") }
        return Array(sequence)
    }

    func string(_ node: Node, _ key: String) throws(LoadError) -> String {
        guard case .scalar(let scalar) = node, node.null == nil || scalar.style != .plain else {
            throw self.error(node, key, "must be a string, got \(Self.kind(node))")
        }
        return scalar.string
    }

    func bool(_ node: Node, _ key: String) throws(LoadError) -> Bool {
        guard case .scalar(let scalar) = node, scalar.style == .plain, let value = node.bool else {
            throw self.error(node, key, "must be true or false, got \(Self.kind(node))")
        }
        return value
    }

    func integer(_ node: Node, _ key: String, _ range: ClosedRange<Int>) throws(LoadError) -> Int {
        guard case .scalar(let scalar) = node, scalar.style == .plain, let value = node.int else {
            throw self.error(node, key, "must be a whole number, got \(Self.kind(node))")
        }
        guard range.contains(value) else {
            throw self.error(node, key, "must be from \(range.lowerBound) to \(range.upperBound), got \(value)")
        }
        return value
    }

    static func kind(_ node: Node) -> String {
        switch node {
        case .mapping: "a mapping"
        case .sequence: "a list"
        case .alias: "an alias"
        case .scalar(let scalar):
            scalar.style == .plain && node.null != nil ? "nothing" : "'\(scalar.string.truncated(toUTF8Bytes: 64))'"
        }
    }

    func schema(_ root: Node) throws(LoadError) -> MeteringSchema {
        // A whole file that is one value is most likely another file given by mistake, such as
        // a secret's: its text is not repeated into the log.
        if case .scalar = root, root.null == nil {
            throw self.error(root, "", "must be a mapping with `metrics:`, got one text value (not shown: this may be another file, such as a secret)")
        }
        let top = try self.mapping(root, "", allowed: ["metrics", "tokens", "routes"])
        guard let metricsNode = top["metrics"] else { throw self.error(root, "metrics", "required") }
        let metricNodes = try self.sequence(metricsNode, "metrics")
        guard !metricNodes.isEmpty else { throw self.error(metricsNode, "metrics", "must list at least one metric") }
        guard metricNodes.count <= MeteringSchema.maximumMetrics else {
            throw self.error(metricsNode, "metrics", "at most \(MeteringSchema.maximumMetrics) metrics, got \(metricNodes.count)")
        }
        var metrics: [MeteringSchema.Metric] = []
        var names: Set<String> = []
        for (index, node) in metricNodes.enumerated() {
            let metric = try self.metric(node, "metrics[\(index)]")
            guard names.insert(metric.name).inserted else {
                throw self.error(node, "metrics[\(index)].name", "'\(metric.name)' is already a metric")
            }
            metrics.append(metric)
        }
        // Without `tokens:` the built-in token family, unless a /track metric already has its
        // name (configs written before token families existed keep working as they were).
        var tokens = MeteringSchema.defaultTokens.filter { !names.contains($0.name) }
        if let tokensNode = top["tokens"] {
            let nodes = try self.sequence(tokensNode, "tokens")
            guard nodes.count <= MeteringSchema.maximumMetrics else {
                throw self.error(tokensNode, "tokens", "at most \(MeteringSchema.maximumMetrics) metrics, got \(nodes.count)")
            }
            tokens = []
            for (index, node) in nodes.enumerated() {
                let key = "tokens[\(index)]"
                let metric = try self.metric(node, key, answers: true)
                guard names.insert(metric.name).inserted else {
                    throw self.error(node, "\(key).name", "'\(metric.name)' is already a metric")
                }
                tokens.append(metric)
            }
        }
        var routes: [String] = []
        if let routesNode = top["routes"] {
            let nodes = try self.sequence(routesNode, "routes")
            guard nodes.count <= MeteringSchema.maximumRoutes else {
                throw self.error(routesNode, "routes", "at most \(MeteringSchema.maximumRoutes) routes, got \(nodes.count)")
            }
            for (index, node) in nodes.enumerated() {
                let route = try self.string(node, "routes[\(index)]")
                guard route.hasPrefix("/"), !route.contains("?"), !route.contains("#"), route.utf8.count <= 256 else {
                    throw self.error(node, "routes[\(index)]", "must be a path starting with '/', without '?' or '#', at most 256 bytes")
                }
                routes.append(route)
            }
        }
        return MeteringSchema(metrics: metrics, tokens: tokens, routes: routes)
    }


    /// `answers`: a token family, whose labels read the request's headers and the answer's
    /// `model` and `type`, and whose increment is the type's token count (no `value`).
    func metric(_ node: Node, _ key: String, answers: Bool = false) throws(LoadError) -> MeteringSchema.Metric {
        let fields = try self.mapping(node, key, allowed: answers ? ["name", "help", "max_series", "labels"] : ["name", "help", "max_series", "value", "labels"])
        guard let nameNode = fields["name"] else { throw self.error(node, "\(key).name", "required") }
        let name = try self.string(nameNode, "\(key).name")
        guard MeteringSchema.isValidMetricName(name) else {
            throw self.error(nameNode, "\(key).name", "'\(name.truncated(toUTF8Bytes: 64))' is not a valid metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)")
        }
        guard !name.hasPrefix("usage_tracking_"), !name.hasPrefix("process_") else {
            throw self.error(nameNode, "\(key).name", "'\(name)' is reserved: usage_tracking_ and process_ name this service's own metrics")
        }
        let help = try fields["help"].map { (node) throws(LoadError) in try self.string(node, "\(key).help") } ?? "Usage counted by usage-tracking."
        let maxSeries = try fields["max_series"].map { (node) throws(LoadError) in
            try self.integer(node, "\(key).max_series", MeteringSchema.maxSeriesRange)
        } ?? MeteringSchema.defaultMaxSeries
        var value: MeteringSchema.ValueSource?
        if let valueNode = fields["value"] {
            let entries = try self.mapping(valueNode, "\(key).value", allowed: ["from", "required"])
            guard let from = entries["from"] else { throw self.error(valueNode, "\(key).value.from", "required") }
            let field = try self.fieldName(from, "\(key).value.from")
            let required = try entries["required"].map { (node) throws(LoadError) in try self.bool(node, "\(key).value.required") } ?? false
            value = MeteringSchema.ValueSource(from: field, required: required)
        }
        guard let labelsNode = fields["labels"] else { throw self.error(node, "\(key).labels", "required") }
        let labelNodes = try self.sequence(labelsNode, "\(key).labels")
        guard labelNodes.count <= MeteringSchema.maximumLabels else {
            throw self.error(labelsNode, "\(key).labels", "at most \(MeteringSchema.maximumLabels) labels, got \(labelNodes.count)")
        }
        var labels: [MeteringSchema.Label] = []
        for (index, labelNode) in labelNodes.enumerated() {
            let label = try self.label(labelNode, "\(key).labels[\(index)]", answers: answers)
            guard !labels.contains(where: { $0.name == label.name }) else {
                throw self.error(labelNode, "\(key).labels[\(index)].name", "'\(label.name)' is already a label of \(name)")
            }
            labels.append(label)
        }
        if answers {
            let types = labels.filter { $0.source == .body(MeteringSchema.TokenField.type) }
            guard types.count == 1 else {
                throw self.error(labelsNode, "\(key).labels", "needs exactly one label from type, got \(types.count): token types overlap (cached_input is part of input), so one series must never add them up")
            }
        }
        return MeteringSchema.Metric(name: name, help: help, maxSeries: maxSeries, value: value, labels: labels)
    }

    /// A body field: dotted names into nested objects, each part non-empty.
    func fieldName(_ node: Node, _ key: String) throws(LoadError) -> String {
        let field = try self.string(node, key)
        let parts = field.split(separator: ".", omittingEmptySubsequences: false)
        guard !field.isEmpty, field.utf8.count <= 256, parts.count <= 8, parts.allSatisfy({ !$0.isEmpty }) else {
            throw self.error(node, key, "must be a field name, with dots between non-empty parts (at most 8 parts, 256 bytes)")
        }
        return field
    }

    func label(_ node: Node, _ key: String, answers: Bool = false) throws(LoadError) -> MeteringSchema.Label {
        let fields = try self.mapping(node, key, allowed: ["name", "from", "header", "kind", "required", "default", "max_values", "hash"])
        guard let nameNode = fields["name"] else { throw self.error(node, "\(key).name", "required") }
        let name = try self.string(nameNode, "\(key).name")
        guard MeteringSchema.isValidLabelName(name) else {
            throw self.error(nameNode, "\(key).name", "'\(name.truncated(toUTF8Bytes: 64))' is not a valid label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)")
        }
        let source: MeteringSchema.Source
        switch (fields["from"], fields["header"]) {
        case (let from?, nil):
            let field = try self.fieldName(from, "\(key).from")
            if answers, field != MeteringSchema.TokenField.model, field != MeteringSchema.TokenField.type {
                throw self.error(from, "\(key).from", "a token family reads model or type from the answer (and headers with header:), got '\(field.truncated(toUTF8Bytes: 64))'")
            }
            source = .body(field)
        case (nil, let header?):
            let headerName = try self.string(header, "\(key).header")
            // HTTP/2's pseudo-header :path is what Envoy hands over for the request's path.
            let pseudo = answers && headerName == ":path"
            guard pseudo || (!headerName.isEmpty && headerName.utf8.count <= 256 && headerName.utf8.allSatisfy(isHeaderNameByte)) else {
                throw self.error(header, "\(key).header", "'\(headerName.truncated(toUTF8Bytes: 64))' is not a header name")
            }
            source = .header(headerName.lowercased())
        case (_?, let header?):
            throw self.error(header, "\(key).header", "give either from or header, not both")
        case (nil, nil):
            throw self.error(node, "\(key).from", "required (or header)")
        }
        var kind = MeteringSchema.Kind.string
        if let kindNode = fields["kind"] {
            let text = try self.string(kindNode, "\(key).kind")
            guard let parsed = MeteringSchema.Kind(rawValue: text) else {
                throw self.error(kindNode, "\(key).kind", "must be one of string, set, route, got '\(text.truncated(toUTF8Bytes: 64))'")
            }
            kind = parsed
        }
        let required = try fields["required"].map { (node) throws(LoadError) in try self.bool(node, "\(key).required") } ?? false
        let defaultValue = try fields["default"].map { (node) throws(LoadError) in try self.string(node, "\(key).default") } ?? ""
        if let defaultNode = fields["default"] {
            guard !required else { throw self.error(defaultNode, "\(key).default", "a required label has no default") }
            guard defaultValue != MeteringSchema.overflowValue, defaultValue.utf8.count <= 256 else {
                throw self.error(defaultNode, "\(key).default", "must not be \(MeteringSchema.overflowValue) and at most 256 bytes")
            }
        }
        let maxValues = try fields["max_values"].map { (node) throws(LoadError) in
            try self.integer(node, "\(key).max_values", MeteringSchema.maxValuesRange)
        } ?? MeteringSchema.defaultMaxValues
        var hash: MeteringSchema.Hash?
        if let hashNode = fields["hash"] {
            let text = try self.string(hashNode, "\(key).hash")
            guard let parsed = MeteringSchema.Hash(rawValue: text) else {
                throw self.error(hashNode, "\(key).hash", "must be hmac-sha256, got '\(text.truncated(toUTF8Bytes: 64))'")
            }
            hash = parsed
        }
        return MeteringSchema.Label(
            name: name, source: source, kind: kind, required: required, defaultValue: defaultValue, maxValues: maxValues, hash: hash
        )
    }
}

/// The characters HTTP allows in a header name (RFC 9110 "tchar").
public func isHeaderNameByte(_ byte: UInt8) -> Bool {
    switch byte {
    case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"): true
    default: "!#$%&'*+-.^_`|~".utf8.contains(byte)
    }
}
