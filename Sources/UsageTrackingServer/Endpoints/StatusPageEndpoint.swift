import NIOCore
import NIOHTTP1
import UsageTrackingCore

/// `GET /` (and `GET /debug` from a browser): one self-contained HTML page with what `/debug`
/// reports, for someone who reached a pod through `kubectl port-forward`.
///
/// Safety: every value that is not part of the page's own source goes through
/// `HTMLText.escaped`; the page loads nothing (its style and script are inline, the chart is
/// inline SVG), and the `Content-Security-Policy` allows only the inline style and script that
/// carry this reply's nonce, `fetch` to the same origin, and nothing else. Its script refreshes
/// the page from the JSON `/debug` and writes values with `textContent` only.
///
/// Size: bounded whatever the number of series: the top 20 values per label, the 20 newest
/// accepted and refused callbacks, 50 series of one user, each value at most
/// `--max-label-bytes`.
enum StatusPageEndpoint {
    /// Recent callbacks listed on the page (the JSON keeps all 100).
    static let recentShown = 20
    /// How often the page refreshes itself, in milliseconds.
    static let refreshMilliseconds = 2000

    static func reply(_ head: RequestHead, state: ServerState) -> HTTPResponse {
        guard let report = StatusReport.gather(state: state, user: StatusReport.requestedUser(head.uri)) else {
            return .error(.notFound, "not found", ["the status page is turned off (--no-debug)"])
        }
        let nonce = Self.makeNonce()
        return HTTPResponse(
            status: .ok, contentType: "text/html; charset=utf-8",
            headers: [
                ("content-security-policy", Self.contentSecurityPolicy(nonce: nonce)),
                ("x-content-type-options", "nosniff"),
                ("referrer-policy", "no-referrer"),
                ("cache-control", "no-store"),
            ],
            body: Array(Self.html(report, nonce: nonce).utf8)
        )
    }

    /// Nothing but this reply's own style and script; data: images (none today); `fetch` only to
    /// the origin; the lookup form only to the origin; no framing, no `<base>`.
    static func contentSecurityPolicy(nonce: String) -> String {
        "default-src 'none'; script-src 'nonce-\(nonce)'; style-src 'nonce-\(nonce)'; img-src data:; connect-src 'self'; "
            + "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    }

    /// 128 random bits as hex (hex digits are valid in a CSP nonce), new for every reply, so an
    /// injected `<script>` could not carry it even if escaping failed.
    static func makeNonce() -> String {
        var generator = SystemRandomNumberGenerator()
        return (0..<2).map { _ in
            let hex = String(generator.next() as UInt64, radix: 16)
            return String(repeating: "0", count: 16 - hex.count) + hex
        }.joined()
    }

    /// Whether the client wants HTML rather than JSON: `text/html` listed with a quality above 0
    /// and at least that of `application/json`. Browsers send `text/html,…,*/*;q=0.8`; curl sends
    /// `*/*`, which keeps the JSON.
    static func prefersHTML(_ head: RequestHead) -> Bool {
        var html: Double? = nil
        var json: Double? = nil
        for item in head.listItems(name: "accept") {
            let parts = item.split(separator: ";").map { $0.trimmingASCIISpaces().lowercased() }
            guard let type = parts.first else { continue }
            let quality = parts.dropFirst().first { $0.hasPrefix("q=") }.flatMap { Double($0.dropFirst(2)) } ?? 1
            if type == "text/html" { html = max(html ?? 0, quality) }
            if type == "application/json" { json = max(json ?? 0, quality) }
        }
        guard let html, html > 0 else { return false }
        return html >= (json ?? 0)
    }

    // MARK: the page

    static func html(_ report: StatusReport, nonce: String) -> String {
        let page = HTMLPage()
        let host = report.hostName
        page.raw("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">")
        page.raw("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
        page.raw("<title>usage-tracking · ").text(host).raw("</title>")
        page.raw("<style nonce=\"\(nonce)\">\(Self.style)</style></head>\n<body>\n")

        page.raw("<header><h1>usage-tracking on <span id=\"host\">").text(host).raw("</span></h1>")
        page.raw("<p>version <span id=\"version\">").text(UsageMetrics.version).raw("</span> · up <span id=\"uptime\">")
            .text(Self.duration(report.uptimeSeconds)).raw("</span> · started <span id=\"started\">")
            .text(JSONLogHandler.timestamp(unixSeconds: report.startedAt))
            .raw("</span> · <span id=\"refresh-state\">refreshing every \(Self.refreshMilliseconds / 1000) s</span> ")
            .raw("<button id=\"pause\" type=\"button\">Pause</button></p>")
        page.raw("<form method=\"get\" action=\"/\"><label>One user: <input name=\"user\" value=\"").text(report.user?.name ?? "")
            .raw("\"></label> <button type=\"submit\">Show</button>")
        if report.user != nil { page.raw(" <a href=\"/\">all users</a>") }
        page.raw("</form></header>\n")

        if let user = report.user { Self.userSection(user, report: report, into: page) }

        page.raw("<section><h2>Callbacks</h2><div class=\"row\"><table><thead><tr><th>outcome</th><th>count</th></tr></thead><tbody id=\"outcomes\">")
        for (outcome, count) in report.outcomes {
            page.row([outcome.rawValue, String(count)])
        }
        page.raw("</tbody></table><div><p id=\"rates\">").text(Self.ratesText(report.rates)).raw("</p>")
        Self.chart(report.rates, into: page)
        page.raw("</div></div></section>\n")

        if !report.tokenStreams.isEmpty {
            page.raw("<section><h2>Model answers</h2><p>read through Envoy's ext_proc filter; the token tables below rank input and output tokens</p>")
                .raw("<table><thead><tr><th>outcome</th><th>answers</th></tr></thead><tbody id=\"token-streams\">")
            for (outcome, count) in report.tokenStreams { page.row([outcome.rawValue, String(count)]) }
            page.raw("</tbody></table></section>\n")
        }

        page.raw("<section><h2>Top by count</h2><p>series held: <span id=\"series\">")
            .text(report.series.map { "\($0.name) \($0.count)" }.joined(separator: ", "))
            .raw("</span> · ranked at <span id=\"ranked-at\">").text(JSONLogHandler.timestamp(unixSeconds: report.rankings.computedAt))
            .raw("</span></p><div class=\"row\">")
        for family in report.rankings.families {
            for (index, ranking) in family.labels.enumerated() {
                let id = "top-\(family.name)-\(ranking.labelName)"
                let budget = report.budgets[family.name]?[index]
                let budgetText = budget.flatMap { budget in budget.limit.map { "; budget \(budget.held) of \($0)" } } ?? ""
                page.raw("<table><caption>").text(ranking.labelName).raw(" (<span id=\"").text(id + "-distinct").raw("\">")
                    .text(String(ranking.distinctValues)).raw("</span> values<span id=\"").text(id + "-budget").raw("\">").text(budgetText)
                    .raw("</span>)</caption><thead><tr><th>").text(ranking.labelName)
                    .raw("</th><th>count</th></tr></thead><tbody id=\"").text(id).raw("\">")
                for entry in ranking.top {
                    page.raw("<tr><td>")
                    if ranking.labelName == "user" { page.userLink(entry.value) } else { page.text(entry.value) }
                    page.raw("</td><td>").text(String(entry.count)).raw("</td></tr>")
                }
                page.raw("</tbody></table>")
            }
        }
        page.raw("</div></section>\n")

        page.raw("<section><h2>Recent refused callbacks</h2><table><thead><tr><th>time</th><th>status</th><th>outcome</th><th>problems</th>")
            .raw("<th>request id</th><th>from</th></tr></thead><tbody id=\"recent-rejected\">")
        for entry in report.recentRejected.prefix(Self.recentShown) {
            page.row([
                JSONLogHandler.timestamp(unixSeconds: entry.time), String(entry.status), entry.rejection.outcome.rawValue,
                entry.rejection.problems.joined(separator: "; "), entry.requestID ?? "—", entry.sender ?? "—",
            ])
        }
        page.raw("</tbody></table></section>\n")

        page.raw("<section><h2>Recent accepted callbacks</h2>")
        Self.acceptedTable(report.recentAccepted.prefix(Self.recentShown), id: "recent-accepted", into: page)
        page.raw("</section>\n")

        page.raw("<section><h2>Scrapes and secrets</h2><dl>")
        page.raw("<dt>last /metrics scrape</dt><dd id=\"last-scrape\">").text(Self.scrapeText(report.lastScrape)).raw("</dd>")
        page.raw("<dt>authentication</dt><dd id=\"authentication\">").text(Self.authenticationText(report)).raw("</dd>")
        page.raw("<dt>last secret reload</dt><dd id=\"last-reload\">").text(Self.reloadText(report.lastReload)).raw("</dd>")
        page.raw("<dt>last secret matched</dt><dd id=\"last-match\">").text(Self.matchText(report.lastSecretMatch)).raw("</dd>")
        page.raw("</dl></section>\n")

        page.raw("<section><h2>Settings</h2><table><tbody id=\"settings\">")
        for (name, value) in report.configuration {
            page.row([name, Self.plain(value)])
        }
        page.raw("</tbody></table></section>\n")
        page.raw("<script nonce=\"\(nonce)\">\(Self.script)</script>\n</body></html>\n")
        return page.text
    }

    private static func userSection(_ user: StatusReport.UserView, report: StatusReport, into page: HTMLPage) {
        page.raw("<section id=\"user-view\"><h2>User <span id=\"user-name\">").text(user.name).raw("</span></h2>")
        page.raw("<p><span id=\"user-total\">").text(String(user.total)).raw("</span> requests counted in <span id=\"user-series-count\">")
            .text(String(user.seriesCount)).raw("</span> series")
        if user.seriesCount > user.series.count { page.raw(" (the \(user.series.count) largest shown)") }
        page.raw("</p><table><thead><tr>")
        for name in report.labelNames { page.raw("<th>").text(name).raw("</th>") }
        page.raw("<th>count</th></tr></thead><tbody id=\"user-series\">")
        for series in user.series {
            page.row(series.labels + [String(series.value)])
        }
        page.raw("</tbody></table><h3>Recent accepted callbacks of this user</h3>")
        Self.acceptedTable(user.recentAccepted.prefix(Self.recentShown), id: "user-recent", into: page)
        page.raw("</section>\n")
    }

    private static func acceptedTable(_ entries: ArraySlice<RecentCallbacks.Accepted>, id: String, into page: HTMLPage) {
        page.raw("<table><thead><tr><th>time</th><th>user</th><th>groups</th><th>path</th><th>method</th><th>host</th>")
            .raw("<th>request id</th><th>from</th></tr></thead><tbody id=\"\(id)\">")
        for entry in entries {
            page.raw("<tr><td>").text(JSONLogHandler.timestamp(unixSeconds: entry.time)).raw("</td><td>")
            page.userLink(entry.callback.user)
            page.raw("</td>")
            for cell in [entry.callback.groups, entry.callback.path, entry.callback.method, entry.callback.host, entry.requestID ?? "—", entry.sender ?? "—"] {
                page.raw("<td>").text(cell).raw("</td>")
            }
            page.raw("</tr>")
        }
        page.raw("</tbody></table>")
    }

    /// Accepted (green) and refused (red) callbacks per second over the last five minutes,
    /// oldest on the left; the script redraws the same two polylines.
    private static func chart(_ rates: [StatusReport.Rate], into page: HTMLPage) {
        let peak = max(1, rates.map { $0.perSecond.max() ?? 0 }.max() ?? 0)
        page.raw("<svg id=\"chart\" viewBox=\"0 0 \(Self.chartWidth) \(Self.chartHeight)\" width=\"\(Self.chartWidth)\" height=\"\(Self.chartHeight)\" ")
            .raw("role=\"img\" aria-label=\"callbacks per second over the last 5 minutes\">")
            .raw("<rect x=\"0\" y=\"0\" width=\"\(Self.chartWidth)\" height=\"\(Self.chartHeight)\" fill=\"#fafafa\" stroke=\"#ccc\"/>")
        for rate in rates {
            page.raw("<polyline id=\"chart-\(rate.kind.name)\" fill=\"none\" stroke-width=\"1.5\" stroke=\"\(rate.kind == .accepted ? "#2a7d2a" : "#c0392b")\" points=\"")
                .raw(Self.points(rate.perSecond, peak: peak)).raw("\"/>")
        }
        page.raw("<text id=\"chart-peak\" x=\"4\" y=\"12\" font-size=\"11\" fill=\"#555\">").text("peak \(peak)/s").raw("</text></svg>")
        page.raw("<p class=\"legend\"><span class=\"accepted\">■ accepted</span> <span class=\"refused\">■ refused</span> per second, last 5 minutes</p>")
    }

    static let chartWidth = 600
    static let chartHeight = 120

    static func points(_ counts: [UInt64], peak: UInt64) -> String {
        let step = Double(Self.chartWidth) / Double(max(1, counts.count - 1))
        return counts.enumerated().map { index, count in
            let x = (Double(index) * step * 10).rounded() / 10
            let y = Int((Double(Self.chartHeight) - 2 - Double(count) / Double(peak) * Double(Self.chartHeight - 16)).rounded())
            return "\(x),\(y)"
        }.joined(separator: " ")
    }

    // MARK: wording shared with the script (which words the same facts the same way)

    static func ratesText(_ rates: [StatusReport.Rate]) -> String {
        rates.map { "\($0.kind.name): \(Self.perSecond($0.lastMinute))/s over 1 min, \(Self.perSecond($0.lastFiveMinutes))/s over 5 min" }
            .joined(separator: " · ")
    }

    private static func perSecond(_ value: Double) -> String {
        String((value * 100).rounded() / 100)
    }

    static func scrapeText(_ scrape: StatusEvents.Scrape?) -> String {
        guard let scrape else { return "none yet" }
        return "\(JSONLogHandler.timestamp(unixSeconds: scrape.time)) from \(scrape.from ?? "unknown"), rendered in \(Self.milliseconds(scrape.renderSeconds)) ms"
    }

    private static func milliseconds(_ seconds: Double) -> String {
        String((seconds * 1e5).rounded() / 100)
    }

    static func authenticationText(_ report: StatusReport) -> String {
        let config = Dictionary(report.configuration, uniquingKeysWith: { a, _ in a })
        return "\(Self.plain(config["authentication"] ?? .null)), \(Self.plain(config["callback_secrets_loaded"] ?? .null)) secrets loaded"
    }

    static func reloadText(_ reload: StatusEvents.SecretReload?) -> String {
        guard let reload else { return "none" }
        return "\(JSONLogHandler.timestamp(unixSeconds: reload.time)): \(reload.result)"
    }

    static func matchText(_ match: StatusEvents.SecretMatch?) -> String {
        guard let match else { return "none yet" }
        return "secret #\(match.position) (0-based: the environment's first, then the file's lines) at \(JSONLogHandler.timestamp(unixSeconds: match.time))"
    }

    static func duration(_ seconds: Double) -> String {
        let whole = Int(seconds)
        let (days, hours, minutes, rest) = (whole / 86400, whole / 3600 % 24, whole / 60 % 60, whole % 60)
        if days > 0 { return "\(days)d \(hours)h \(minutes)m" }
        if hours > 0 { return "\(hours)h \(minutes)m \(rest)s" }
        return minutes > 0 ? "\(minutes)m \(rest)s" : "\(rest)s"
    }

    private static func plain(_ value: JSONText) -> String {
        switch value {
        case .string(let text): text
        case .null: "—"
        default: value.serialized
        }
    }

    static let style = """
        body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222}h1{font-size:1.4em;margin:.2em 0}\
        h2{font-size:1.15em;border-bottom:1px solid #ddd;margin-top:1.4em}table{border-collapse:collapse;margin:.3em 1.5em .8em 0}\
        td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top;overflow-wrap:anywhere;max-width:28em}\
        th{background:#f3f3f3;white-space:nowrap}tbody td:first-child,tbody td:last-child{white-space:nowrap}caption{text-align:left;font-weight:600}.row{display:flex;flex-wrap:wrap;align-items:flex-start}\
        .accepted{color:#2a7d2a}.refused{color:#c0392b}.legend{margin:0;font-size:12px}dt{font-weight:600}dd{margin:0 0 .5em 1em}\
        #refresh-state.paused{color:#c0392b}
        """

    /// Fetches the JSON `/debug` (with this page's `?user=`) every few seconds and writes it into
    /// the page: text through `textContent`, rows built with `createElement`, user links through
    /// `href` with an encoded query. Never `innerHTML`.
    static let script = """
        (function(){'use strict';
        var every=\(refreshMilliseconds),paused=false,timer=null,shown=\(recentShown),W=\(chartWidth),H=\(chartHeight);
        function $(id){return document.getElementById(id);}
        function put(id,v){var e=$(id);if(e)e.textContent=(v===null||v===undefined)?'—':String(v);}
        function userLink(name){var a=document.createElement('a');a.href='/?user='+encodeURIComponent(name);a.textContent=name;return a;}
        function rows(id,data){var body=$(id);if(!body)return;var f=document.createDocumentFragment();
        data.forEach(function(r){var tr=document.createElement('tr');r.forEach(function(c){var td=document.createElement('td');
        if(c&&typeof c==='object'&&'user' in c)td.appendChild(userLink(c.user));else td.textContent=(c===null||c===undefined)?'—':String(c);
        tr.appendChild(td);});f.appendChild(tr);});body.replaceChildren(f);}
        function duration(s){s=Math.floor(s);var d=Math.floor(s/86400),h=Math.floor(s/3600)%24,m=Math.floor(s/60)%60,r=s%60;
        if(d>0)return d+'d '+h+'h '+m+'m';if(h>0)return h+'h '+m+'m '+r+'s';return m>0?m+'m '+r+'s':r+'s';}
        function num(v){return String(Math.round(v*100)/100);}
        function points(c,peak){var step=W/Math.max(1,c.length-1);return c.map(function(v,i){
        return (Math.round(i*step*10)/10)+','+Math.round(H-2-v/peak*(H-16));}).join(' ');}
        function accepted(list){return list.slice(0,shown).map(function(e){
        return [e.time,{user:e.user},e.groups,e.path,e.method,e.host,e.request_id,e.sender];});}
        function render(d){
        put('host',d.host_name);put('version',d.version);put('uptime',duration(d.uptime_seconds));
        rows('outcomes',Object.keys(d.callbacks).map(function(k){return [k,d.callbacks[k]];}));
        if(document.getElementById('token-streams'))rows('token-streams',Object.keys(d.token_streams).map(function(k){return [k,d.token_streams[k]];}));
        var kinds=['accepted','refused'];
        put('rates',kinds.map(function(k){return k+': '+num(d.rates[k].last_1m)+'/s over 1 min, '+num(d.rates[k].last_5m)+'/s over 5 min';}).join(' · '));
        var peak=Math.max(1,Math.max.apply(null,d.per_second.accepted.concat(d.per_second.refused)));
        kinds.forEach(function(k){var p=$('chart-'+k);if(p)p.setAttribute('points',points(d.per_second[k],peak));});
        put('chart-peak','peak '+peak+'/s');
        put('series',Object.keys(d.series).map(function(k){return k+' '+d.series[k];}).join(', '));
        put('ranked-at',d.top.computed_at);
        Object.keys(d.top).forEach(function(f){if(f==='computed_at')return;Object.keys(d.top[f]).forEach(function(l){
        var id='top-'+f+'-'+l,b=d.top[f][l].budget;put(id+'-distinct',d.top[f][l].distinct);
        put(id+'-budget',b?'; budget '+b.held+' of '+b.limit:'');
        rows(id,d.top[f][l].top.map(function(e){return [l==='user'?{user:e.value}:e.value,e.count];}));});});
        rows('recent-rejected',d.recent_rejected.slice(0,shown).map(function(e){
        return [e.time,e.status,e.outcome,e.problems.join('; '),e.request_id,e.sender];}));
        rows('recent-accepted',accepted(d.recent_accepted));
        var s=d.last_scrape;put('last-scrape',s?s.time+' from '+(s.from||'unknown')+', rendered in '+(Math.round(s.render_seconds*1e5)/100)+' ms':'none yet');
        put('authentication',d.configuration.authentication+', '+d.configuration.callback_secrets_loaded+' secrets loaded');
        var r=d.secrets.last_reload;put('last-reload',r?r.time+': '+r.result:'none');
        var m=d.secrets.last_match;put('last-match',m?'secret #'+m.position+' (0-based: the environment\\'s first, then the file\\'s lines) at '+m.time:'none yet');
        rows('settings',Object.keys(d.configuration).map(function(k){return [k,d.configuration[k]];}));
        if(d.user){put('user-total',d.user.total);put('user-series-count',d.user.series_count);
        rows('user-series',d.user.series.map(function(s){return Object.keys(s.labels).map(function(k){return s.labels[k];}).concat([s.value]);}));
        rows('user-recent',accepted(d.user.recent_accepted));}
        document.documentElement.setAttribute('data-refreshed',String(Date.now()));}
        function schedule(){clearTimeout(timer);if(!paused)timer=setTimeout(tick,every);}
        function tick(){if(paused)return;
        fetch('/debug'+location.search,{headers:{'Accept':'application/json'},cache:'no-store',credentials:'same-origin'})
        .then(function(r){if(!r.ok)throw new Error('HTTP '+r.status);return r.json();})
        .then(function(d){render(d);put('refresh-state','refreshing every '+every/1000+' s');})
        .catch(function(e){put('refresh-state','refresh failed: '+e.message);}).then(schedule);}
        $('pause').addEventListener('click',function(){paused=!paused;this.textContent=paused?'Resume':'Pause';
        $('refresh-state').className=paused?'paused':'';put('refresh-state',paused?'paused':'refreshing every '+every/1000+' s');
        if(paused)clearTimeout(timer);else tick();});
        schedule();})();
        """
}

/// The page being built: `raw` for the page's own markup, `text` for anything else, which is
/// escaped. Keeping the two apart is what keeps data out of the markup. A class, so calls chain.
final class HTMLPage {
    private(set) var text = ""

    init() { self.text.reserveCapacity(32 * 1024) }

    @discardableResult
    func raw(_ markup: String) -> HTMLPage {
        self.text += markup
        return self
    }

    @discardableResult
    func text(_ value: some StringProtocol) -> HTMLPage {
        HTMLText.append(value, to: &self.text)
        return self
    }

    func row(_ cells: [String]) {
        self.raw("<tr>")
        for cell in cells { self.raw("<td>").text(cell).raw("</td>") }
        self.raw("</tr>")
    }

    /// A link to this user's view: the name percent-encoded in the query, and escaped.
    func userLink(_ user: String) {
        self.raw("<a href=\"/?user=").text(HTMLText.queryComponent(user)).raw("\">").text(user).raw("</a>")
    }
}
