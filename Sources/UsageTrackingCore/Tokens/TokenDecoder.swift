/// Turns what one model answer used, with the headers of the request it answered, into what the
/// token families count: one `Callback` per token type the answer reports, its label values
/// decoded exactly as `/track`'s are (the same normalisation, templates, hashing, byte limit and
/// reserved `__other__`), or a rejection naming every problem.
///
/// The answer is presented to the `/track` decoder as the fields `model`, `type` and `tokens`,
/// with `tokens` as each token family's value, so a token label cannot be checked differently
/// from a callback's.
public struct TokenDecoder: Sendable {
    private let decoder: CallbackDecoder
    /// Where the token families start among all families (`UsageMetrics.families`).
    public let familyOffset: Int
    private let model: Int
    private let type: Int
    private let tokens: Int

    static let valueField = "tokens"

    public init(schema: MeteringSchema, maximumValueBytes: Int, hasher: LabelHasher?) {
        let families = schema.tokens.map { metric in
            var metric = metric
            metric.value = MeteringSchema.ValueSource(from: Self.valueField, required: true)
            return metric
        }
        self.decoder = CallbackDecoder(
            schema: MeteringSchema(metrics: families, tokens: [], routes: schema.routes), maximumValueBytes: maximumValueBytes, hasher: hasher
        )
        self.familyOffset = schema.metrics.count
        let fields = self.decoder.plan.fields
        self.model = fields.firstIndex(of: MeteringSchema.TokenField.model) ?? fields.count
        self.type = fields.firstIndex(of: MeteringSchema.TokenField.type) ?? fields.count
        self.tokens = fields.firstIndex(of: Self.valueField)!
    }

    /// Request headers the token families read; `decode` takes their values in this order.
    public var headerNames: [String] { self.decoder.headerNames }

    /// Whether the header at `index` of `headerNames` feeds a required label: its absence means
    /// the stream has no identity.
    public func isRequired(header index: Int) -> Bool {
        self.decoder.plan.labels.contains { $0.required && $0.input == .header(index) }
    }

    /// One callback per type with tokens (types with none add nothing), padded so each indexes
    /// every family: nil amounts for the `/track` families.
    public func decode(model: String, counts: [(type: String, amount: UInt64)], headers: [String?]) throws(CallbackRejection) -> [Callback] {
        var callbacks: [Callback] = []
        for (type, amount) in counts where amount > 0 {
            let plan = self.decoder.plan
            var callback = try ScannedFields.withEmpty(fieldCount: plan.fields.count, listFields: plan.listFields, mergesRepeats: false) {
                (fields) throws(CallbackRejection) in
                if self.model < fields.values.count { fields.add(self.model, .text(model)) }
                if self.type < fields.values.count { fields.add(self.type, .text(type)) }
                fields.add(self.tokens, .number(.whole(amount)))
                return try self.decoder.validate(fields, headers: headers)
            }
            callback.families = Array(repeating: 0..<0, count: self.familyOffset) + callback.families
            callback.amounts = Array(repeating: nil, count: self.familyOffset) + callback.amounts
            callbacks.append(callback)
        }
        return callbacks
    }
}
