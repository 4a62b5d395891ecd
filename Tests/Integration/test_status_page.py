"""The status page (`GET /`) in a real browser: Debian's headless Chromium driven over the
DevTools protocol (CDP) with a small client on PyPI's websocket-client.

What it proves, after known callbacks: the DOM shows the users, the counts, a refused request id
and its problem; a hostile user name and request id make no element and run no script, both as
the server renders them and as the page's own refresh re-renders them; nothing is requested
outside the page's origin and no Content-Security-Policy violation happens (with a positive
control showing that a violation would be seen); the refresh picks up a new callback, and pausing
stops it. A screenshot is written to .build/test-artifacts/status-page.png.

Every wait is bounded. Chromium runs with --no-sandbox only when the suite runs as root, where
Chromium refuses to start with its sandbox."""
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

import pytest
import websocket  # PyPI's websocket-client, which Tests/run-suite installs into .venv-tests/

from conftest import ROOT, Service, need, request

ARTIFACTS = os.path.join(ROOT, ".build", "test-artifacts")
HOSTILE_USER = '<img src=x onerror="window.__pwned=1">'
HOSTILE_REQUEST_ID = "<script>window.__pwned=2</script>"
HOSTILE_PATH = '/<img src=x onerror="window.__pwned=3">'


class Browser:
    """One headless Chromium with one page, stopped by its process group (started here)."""

    def __init__(self, seconds=30):
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        arguments = [need("chromium"), "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                     "--disable-extensions", "--disable-background-networking", "--disable-sync",
                     "--disable-component-update", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                     "--window-size=1280,1700", "about:blank"]
        if os.geteuid() == 0:
            arguments.insert(1, "--no-sandbox")
        self.process = subprocess.Popen(arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        self.events = []
        self.next_id = 0
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.time() + seconds
        while time.time() < deadline and not os.path.exists(port_file):
            if self.process.poll() is not None:
                self.close()
                pytest.fail("chromium exited before opening its DevTools port")
            time.sleep(0.1)
        if not os.path.exists(port_file):
            self.close()
            pytest.fail("chromium did not open its DevTools port within %d s" % seconds)
        time.sleep(0.2)  # the file is written before its contents on some versions
        with open(port_file) as f:
            port = int(f.readline().strip())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
            page = next(t for t in json.load(reply) if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=10, suppress_origin=True)
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        # Runs before the page's own script and, being the debugger's, outside the page's policy:
        # it only listens for policy violations, so that the test can count them.
        self.call("Page.addScriptToEvaluateOnNewDocument", source=(
            "window.__violations=[];document.addEventListener('securitypolicyviolation',"
            "function(e){window.__violations.push(e.violatedDirective+' '+e.blockedURI);});"))

    def call(self, method, seconds=20, **params):
        self.next_id += 1
        ident = self.next_id
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.time() + seconds
        while time.time() < deadline:
            message = json.loads(self.socket.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)
        raise AssertionError(f"{method}: no answer within {seconds} s")

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def navigate(self, url, seconds=20):
        self.events_before = len(self.events)
        self.call("Page.navigate", url=url)
        deadline = time.time() + seconds
        while time.time() < deadline:
            if any(e["method"] == "Page.loadEventFired" for e in self.events[self.events_before:]):
                return
            self.evaluate("1")  # pumps events while waiting
            time.sleep(0.1)
        raise AssertionError(f"{url} did not load within {seconds} s")

    def wait_for(self, expression, seconds):
        """Polls `expression` until it is truthy; returns whether it became so in time."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.evaluate(expression):
                return True
            time.sleep(0.2)
        return False

    def rows(self, tbody):
        return self.evaluate(f"Array.from(document.querySelectorAll('#{tbody} tr'))"
                             ".map(function(r){return Array.from(r.cells).map(function(c){return c.textContent;});})")

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        try:
            if getattr(self, "socket", None):
                self.socket.close()
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
            shutil.rmtree(self.profile, ignore_errors=True)


def post(service, body, request_id=None):
    headers = {"Content-Type": "application/json"}
    if request_id:
        headers["x-request-id"] = request_id
    status, _, _ = request(service.port, "POST", "/track", body=json.dumps(body).encode(), headers=headers)
    return status


@pytest.fixture
def service():
    service = Service()
    yield service
    service.stop()


@pytest.fixture
def browser():
    browser = Browser()
    yield browser
    browser.close()


def test_page_in_chromium(service, browser):
    origin = f"http://127.0.0.1:{service.port}"
    for user in ("alice", "alice", "bob"):
        assert post(service, {"user": user, "groups": "free", "path": "/v1/chat"}) == 202
    assert post(service, {"user": HOSTILE_USER, "groups": "free", "path": HOSTILE_PATH}, request_id=HOSTILE_REQUEST_ID) == 202
    assert post(service, {"groups": "free"}, request_id="refused-req-7") == 422
    request(service.port, "GET", "/metrics")

    browser.navigate(origin + "/")

    def check_content_and_safety(when, accepted_count):
        assert browser.rows("outcomes")[:3] == [["accepted", str(accepted_count)], ["duplicate", "0"], ["invalid", "1"]], when
        # Counts first, ties in byte order: "<" sorts before "b".
        assert browser.rows("top-llm_requests_total-user")[:3] == [["alice", "2"], [HOSTILE_USER, "1"], ["bob", "1"]], when
        assert browser.rows("top-llm_requests_total-path") == [["/v1/chat", str(accepted_count - 1)], [HOSTILE_PATH, "1"]], when
        refused = browser.rows("recent-rejected")
        assert len(refused) == 1, when
        assert refused[0][1:5] == ["422", "invalid", "user: required", "refused-req-7"], when
        assert refused[0][5].startswith("127.0.0.1:"), when
        hostile = next(r for r in browser.rows("recent-accepted") if r[1] == HOSTILE_USER)
        assert hostile[3] == HOSTILE_PATH and hostile[6] == HOSTILE_REQUEST_ID, when
        # The hostile values made no element and ran nothing.
        assert browser.evaluate("document.querySelectorAll('img').length") == 0, when
        assert browser.evaluate("document.scripts.length") == 1, when
        assert browser.evaluate("typeof window.__pwned") == "undefined", when
        assert browser.evaluate("document.getElementById('chart-accepted').getAttribute('points').split(' ').length") == 300

    check_content_and_safety("as the server rendered it", 4)
    assert browser.evaluate("document.getElementById('last-scrape').textContent").find(" from 127.0.0.1:") > 0

    # The refresh picks up a callback made after the page loaded, and re-renders everything.
    assert post(service, {"user": "carol-after-load", "path": "/v1/chat"}, request_id="late-1") == 202
    assert browser.wait_for("document.getElementById('recent-accepted').rows[0].cells[1].textContent==='carol-after-load'", 15), \
        "the page did not refresh within 15 s"
    # The ranking is reused for up to 2 s, so it may take one more refresh to include carol.
    assert browser.wait_for("document.getElementById('top-llm_requests_total-user').rows.length===4", 10)
    check_content_and_safety("as the page's refresh rendered it", 5)
    assert [r[0] for r in browser.rows("top-llm_requests_total-user")] == ["alice", HOSTILE_USER, "bob", "carol-after-load"]

    # Paused, it stops fetching; resumed, it catches up.
    browser.evaluate("document.getElementById('pause').click()")
    assert browser.evaluate("document.getElementById('refresh-state').textContent") == "paused"
    refreshed = browser.evaluate("document.documentElement.getAttribute('data-refreshed')")
    assert post(service, {"user": "dave-while-paused"}) == 202
    time.sleep(5)  # two and a half refresh periods
    assert browser.evaluate("document.documentElement.getAttribute('data-refreshed')") == refreshed
    assert "dave-while-paused" not in browser.evaluate("document.body.textContent")
    browser.evaluate("document.getElementById('pause').click()")
    assert browser.wait_for("document.body.textContent.indexOf('dave-while-paused')>=0", 10)

    os.makedirs(ARTIFACTS, exist_ok=True)
    screenshot = os.path.join(ARTIFACTS, "status-page.png")
    browser.navigate(origin + "/")
    browser.screenshot(screenshot)
    with open(screenshot, "rb") as f:
        png = f.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

    # One user's view.
    browser.navigate(origin + "/?user=alice")
    assert browser.evaluate("document.getElementById('user-total').textContent") == "2"
    assert browser.rows("user-series") == [["alice", "free", "/v1/chat", "2"]]
    assert len(browser.rows("user-recent")) == 2

    # Nothing left the origin, nothing broke the policy, no script failed.
    browser.evaluate("1")
    urls = [e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"]
    assert any(u.startswith(origin + "/debug") for u in urls), "the refresh never fetched /debug"
    assert [u for u in urls if not u.startswith(origin + "/")] == []
    assert browser.evaluate("window.__violations") == []
    assert [e for e in browser.events if e["method"] == "Runtime.exceptionThrown"] == []
    problems = [e["params"]["entry"] for e in browser.events if e["method"] == "Log.entryAdded"
                and e["params"]["entry"]["level"] in ("error", "warning")
                # Chromium asks every origin for a favicon; the service has none.
                and not e["params"]["entry"].get("url", "").endswith("/favicon.ico")]
    assert problems == []

    # Positive control: a request elsewhere is refused by the policy, and the test sees it.
    browser.evaluate("fetch('http://203.0.113.1/x').then(function(){return 'loaded';},function(){return 'refused';})")
    assert browser.wait_for("window.__violations.length===1", 5)
    assert browser.evaluate("window.__violations[0]").startswith("connect-src http://203.0.113.1")


def test_status_page_off_with_no_debug():
    service = Service("--no-debug")
    try:
        status, headers, body = request(service.port, "GET", "/", headers={"Accept": "text/html"})
        assert status == 404
        assert json.loads(body) == {"error": "not found", "problems": ["the status page is turned off (--no-debug)"]}
    finally:
        service.stop()


def test_secret_reloads_and_matches_are_shown(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.write_text("old-secret\n")
    service = Service("--callback-secret-file", str(secrets))
    try:
        def debug():
            return json.loads(request(service.port, "GET", "/debug")[2])["secrets"]
        assert debug()["last_reload"]["result"] == "loaded at startup: 1 secrets"
        assert debug()["last_match"] is None
        secrets.write_text("old-secret\nnew-secret\n")
        service.process.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while time.time() < deadline and debug()["last_reload"]["result"] != "reloaded: 2 secrets in the file":
            time.sleep(0.1)
        assert debug()["last_reload"]["result"] == "reloaded: 2 secrets in the file"
        status, _, _ = request(service.port, "POST", "/track", body=b'{"user":"u"}',
                               headers={"Content-Type": "application/json", "Authorization": "Bearer new-secret"})
        assert status == 202
        assert debug()["last_match"]["position"] == 1
        page = request(service.port, "GET", "/")[2].decode()
        assert "secret #1 (0-based" in page
        assert "new-secret" not in page and "old-secret" not in page
    finally:
        service.stop()
