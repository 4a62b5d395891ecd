"""The service as Prometheus sees it: scraped by a real server, queried through its HTTP API,
linted by promtool."""
import gzip
import subprocess

from conftest import Prometheus, callback, need, request


def test_original_readme_loop_reads_back_exactly_through_prometheus(service):
    prometheus = Prometheus(service.port)
    try:
        hostile = 'evil"user\\with\nnewline-}{,=é'
        for user, group in (("freeuser1", "free"), ("premiumuser1", "premium")):
            for _ in range(15):
                assert service.track(callback(user, group)) == 202
                assert service.track('{"groups":"%s"}' % group) == 422  # never counted
        assert service.track(callback(hostile, "free")) == 202

        result = prometheus.wait_for("llm_requests_total", lambda r: len(r) == 3)
        counts = {(s["metric"]["user"], s["metric"]["groups"], s["metric"]["path"]): s["value"][1] for s in result}
        assert counts == {
            ("freeuser1", "free", "/v1/completions"): "15",
            ("premiumuser1", "premium", "/v1/completions"): "15",
            (hostile, "free", "/v1/completions"): "1",
        }
        assert all(s["metric"]["job"] == "usage-tracking" for s in result)
        _, invalid = prometheus.query('usage_tracking_callbacks_total{outcome="invalid"}')
        assert invalid[0]["value"][1] == "30"
    finally:
        prometheus.stop()


def test_promtool_accepts_the_exposition_with_hostile_labels(service):
    for user in ('quo\\"te', "back\\\\slash", "new\\nline", "tab\\there", "ünïcødé-用户", "}{,=", "\\u0001ctl"):
        assert service.track('{"user":"%s","groups":["b","a"],"path":"/v1/x?key=1"}' % user) == 202
    status, headers, body = request(service.port, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    assert 'llm_requests_total{user="new\\nline",groups="a,b",path="/v1/x"} 1\n' in text
    assert 'llm_requests_total{user="back\\\\slash",groups="a,b",path="/v1/x"} 1\n' in text
    assert 'llm_requests_total{user="quo\\"te",groups="a,b",path="/v1/x"} 1\n' in text
    check = subprocess.run([need("promtool"), "check", "metrics"], input=body, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout + check.stderr == b"", "promtool lint findings"


def test_gzipped_scrape_matches_the_plain_one(service):
    assert service.track(callback("alice", "premium")) == 202
    _, _, plain = request(service.port, "GET", "/metrics")
    status, headers, zipped = request(service.port, "GET", "/metrics", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    families = lambda text: [line for line in text.splitlines() if line.startswith(b"# TYPE")]
    assert families(gzip.decompress(zipped)) == families(plain)
