import Glibc
import Testing

@testable import UsageTrackingCore

private func parse(_ yaml: String) throws(MeteringSchema.LoadError) -> MeteringSchema {
    try MeteringSchema.parse(yaml, file: "c.yaml")
}

private func loadError(_ yaml: String) -> String? {
    do {
        _ = try parse(yaml)
        return nil
    } catch {
        return error.description
    }
}

/// A config using every key: a header label, nested and form-dotted fields, a default, a hashed
/// label, a value field, extra routes, and text that needs escaping.
let everyKeyConfig = """
    metrics:
      - name: llm_requests_total
        help: "Requests by user, tier and \\"mode\\"\\n(second line)"
        max_series: 1000
        labels:
          - {name: user, from: user, required: true, max_values: 50}
          - {name: tier, from: identity.tier, default: free, max_values: 5}
          - {name: auth_mode, header: X-Auth-Mode, default: centralized, max_values: 4}
          - {name: path, from: path, kind: route, max_values: 3}
      - name: llm_tokens_total
        help: Tokens by user and group.
        value: {from: usage.total_tokens, required: false}
        labels:
          - {name: user, from: user, required: true, max_values: 50, hash: hmac-sha256}
          - {name: groups, from: groups, kind: set}
    routes:
      - /{namespace}/{model}/v1/chat/completions
    """

@Suite struct ConfigFileTests {
    @Test func builtInSchemaPrintsAndReadsBackTheSame() throws {
        let printed = MeteringSchema.default.yaml
        let reread = try parse(printed)
        #expect(reread == MeteringSchema.default)
        #expect(reread.yaml == printed)
    }

    @Test func everyKeyRoundTrips() throws {
        let schema = try parse(everyKeyConfig)
        #expect(schema.metrics.count == 2)
        #expect(schema.metrics[0].help == "Requests by user, tier and \"mode\"\n(second line)")
        #expect(schema.metrics[0].labels[1] == MeteringSchema.Label(name: "tier", source: .body("identity.tier"), defaultValue: "free", maxValues: 5))
        #expect(schema.metrics[0].labels[2].source == .header("x-auth-mode"))
        #expect(schema.metrics[1].value == MeteringSchema.ValueSource(from: "usage.total_tokens", required: false))
        #expect(schema.metrics[1].labels[0].hash == .hmacSHA256)
        #expect(schema.metrics[1].labels[1].maxValues == MeteringSchema.defaultMaxValues)
        #expect(schema.metrics[1].maxSeries == MeteringSchema.defaultMaxSeries)
        #expect(schema.routes == ["/{namespace}/{model}/v1/chat/completions"])
        let reread = try parse(schema.yaml)
        #expect(reread == schema)
        #expect(reread.yaml == schema.yaml)
    }

    @Test func awkwardTextRoundTrips() throws {
        var schema = MeteringSchema.default
        schema.metrics[0].help = "tab\t, quote \", backslash \\, bell \u{07}, NEL \u{85}, LS \u{2028}, BOM \u{FEFF}, é, 用户, 😀"
        schema.metrics[0].labels[1].defaultValue = "  spaced: yes # not a comment"
        #expect(try parse(schema.yaml) == schema)
    }

    @Test(arguments: [
        // unknown key
        ("metrics:\n  - name: a_total\n    lables: []\n", "c.yaml:3: metrics[0].lables: unknown key; expected one of name, help, max_series, value, labels"),
        ("metric: []\n", "c.yaml:1: metric: unknown key; expected one of metrics, tokens, routes"),
        // wrong type
        ("metrics:\n  - name: a_total\n    labels: {name: u}\n", "c.yaml:3: metrics[0].labels: must be a list, got a mapping"),
        ("metrics:\n  - name: a_total\n    labels:\n      - {name: u, from: u, required: yes please}\n", "c.yaml:4: metrics[0].labels[0].required: must be true or false, got 'yes please'"),
        ("metrics:\n  - name: a_total\n    max_series: lots\n    labels: []\n", "c.yaml:3: metrics[0].max_series: must be a whole number, got 'lots'"),
        ("metrics:\n  - name: [a]\n    labels: []\n", "c.yaml:2: metrics[0].name: must be a string, got a list"),
        // out of range
        ("metrics:\n  - name: a_total\n    max_series: 0\n    labels: []\n", "c.yaml:3: metrics[0].max_series: must be from 1 to 100000000, got 0"),
        ("metrics:\n  - name: a_total\n    labels:\n      - {name: u, from: u, max_values: 10000001}\n", "c.yaml:4: metrics[0].labels[0].max_values: must be from 1 to 10000000, got 10000001"),
        // duplicate names
        ("metrics:\n  - name: a_total\n    labels: []\n  - name: a_total\n    labels: []\n", "c.yaml:4: metrics[1].name: 'a_total' is already a metric"),
        ("metrics:\n  - name: a_total\n    labels:\n      - {name: u, from: u}\n      - {name: u, from: v}\n", "c.yaml:5: metrics[0].labels[1].name: 'u' is already a label of a_total"),
        ("metrics:\n  - name: a_total\n    name: b_total\n    labels: []\n", "c.yaml:2: name: given more than once"),
        // invalid names
        ("metrics:\n  - name: 9lives\n    labels: []\n", "c.yaml:2: metrics[0].name: '9lives' is not a valid metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"),
        ("metrics:\n  - name: usage_tracking_x\n    labels: []\n", "c.yaml:2: metrics[0].name: 'usage_tracking_x' is reserved: usage_tracking_ and process_ name this service's own metrics"),
        ("metrics:\n  - name: a_total\n    labels:\n      - {name: a-b, from: u}\n", "c.yaml:4: metrics[0].labels[0].name: 'a-b' is not a valid label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)"),
        ("metrics:\n  - name: a_total\n    labels:\n      - {name: __x, from: u}\n", "c.yaml:4: metrics[0].labels[0].name: '__x' is not a valid label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)"),
        // other mistakes
        ("metrics:\n  - name: a_total\n    labels:\n      - {name: k, from: u, kind: sett}\n", "c.yaml:4: metrics[0].labels[0].kind: must be one of string, set, route, got 'sett'"),
        ("metrics:\n  - name: a_total\n    labels:\n      - {name: k, from: u, header: x}\n", "c.yaml:4: metrics[0].labels[0].header: give either from or header, not both"),
        ("metrics:\n  - name: a_total\n    labels:\n      - {name: k}\n", "c.yaml:4: metrics[0].labels[0].from: required (or header)"),
        ("metrics:\n  - name: a_total\n    labels:\n      - {name: k, from: a..b}\n", "c.yaml:4: metrics[0].labels[0].from: must be a field name, with dots between non-empty parts (at most 8 parts, 256 bytes)"),
        ("metrics:\n  - name: a_total\n    labels:\n      - {name: k, from: u, hash: md5}\n", "c.yaml:4: metrics[0].labels[0].hash: must be hmac-sha256, got 'md5'"),
        ("metrics:\n  - name: a_total\n    labels:\n      - {name: k, from: u, required: true, default: x}\n", "c.yaml:4: metrics[0].labels[0].default: a required label has no default"),
        ("metrics:\n  - name: a_total\n    labels:\n      - {name: k, from: u, default: __other__}\n", "c.yaml:4: metrics[0].labels[0].default: must not be __other__ and at most 256 bytes"),
        ("metrics: []\n", "c.yaml:1: metrics: must list at least one metric"),
        ("metrics:\n  - name: a_total\n    labels: [\n", "c.yaml:4: is not valid YAML: did not find expected node content"),
        ("", "c.yaml:1: is empty; it needs `metrics:`"),
        // A secret's file given as the config: its text is not echoed.
        ("S3cr3tValue-abcdef\n", "c.yaml:1: must be a mapping with `metrics:`, got one text value (not shown: this may be another file, such as a secret)"),
        ("line-one\nline-two\n", "c.yaml:1: must be a mapping with `metrics:`, got one text value (not shown: this may be another file, such as a secret)"),
    ])
    func badConfigNamesFileLineAndKey(yaml: String, message: String) {
        #expect(loadError(yaml) == message)
    }

    @Test func missingFileIsNamed() {
        #expect(throws: MeteringSchema.LoadError(file: "/nonexistent/c.yaml", line: nil, key: "", problem: "cannot be read: No such file or directory")) {
            try MeteringSchema.load(file: "/nonexistent/c.yaml")
        }
    }

    @Test func fileIsReadFromDisk() throws {
        let path = "/tmp/usage-tracking-schema-test-\(getpid()).yaml"
        let file = fopen(path, "w")!
        fputs(everyKeyConfig, file)
        fclose(file)
        defer { unlink(path) }
        #expect(try MeteringSchema.load(file: path) == (try parse(everyKeyConfig)))
    }
}
