"""The metering schema from outside: new series seen by a real Prometheus's increase(), hashed
labels checked against Python's own HMAC, and the config file through the binary."""
import hashlib
import hmac
import os
import tempfile
import time

from conftest import Prometheus, Service, callback, request

USERS = 20


def _increase_after_one_callback_per_new_user(*arguments):
    """Starts the service with `arguments`, lets Prometheus scrape it, sends one callback for each
    of USERS new users, and returns what Prometheus's increase() makes of them."""
    service = Service(*arguments)
    prometheus = Prometheus(service.port)
    try:
        assert prometheus.wait_for('up{job="usage-tracking"}', lambda r: r and r[0]["value"][1] == "1"), "never scraped"
        for index in range(USERS):
            assert service.track(callback(f"new-user-{index}", "free")) == 202
        # Long enough for the hold (3 s) to end and several scrapes of the real values after it.
        prometheus.wait_for("count(llm_requests_total > 0)", lambda r: r and r[0]["value"][1] == str(USERS))
        time.sleep(4)
        status, result = prometheus.query("sum(increase(llm_requests_total[2m]))")
        assert status == "success", result
        return float(result[0]["value"][1])
    finally:
        prometheus.stop()
        service.stop()


def test_increase_sees_the_first_request_of_new_series_only_with_the_hold():
    held = _increase_after_one_callback_per_new_user("--new-series-hold", "3")
    unheld = _increase_after_one_callback_per_new_user()
    # increase() extrapolates a little towards the end of the window, never below a 0 start.
    assert USERS * 0.95 <= held <= USERS * 1.3, held
    assert unheld < USERS * 0.05, unheld


def test_hashed_label_matches_python_hmac():
    key = b"an-operator-chosen-key \xe2\x9c\x93"
    directory = tempfile.mkdtemp(prefix="usage-tracking-hmac-")
    key_file = os.path.join(directory, "key")
    with open(key_file, "wb") as f:
        f.write(key + b"\n")  # the trailing newline is not part of the key
    config = os.path.join(directory, "config.yaml")
    with open(config, "w") as f:
        f.write("metrics:\n  - name: llm_requests_total\n    labels:\n"
                "      - {name: user, from: user, required: true, hash: hmac-sha256}\n")
    service = Service("--config", config, "--label-hmac-key-file", key_file, "--log-level", "debug")
    try:
        users = ["alice", "Zoë-用户", "x" * 256]
        for user in users:
            body = '{"user":"%s"}' % user
            assert request(service.port, "POST", "/track", body=body.encode(), headers={"Content-Type": "application/json"})[0] == 202
        _, _, metrics = request(service.port, "GET", "/metrics")
        _, _, debug = request(service.port, "GET", "/debug")
        for user in users:
            expected = hmac.new(key, user.encode(), hashlib.sha256).hexdigest()[:16]
            assert f'llm_requests_total{{user="{expected}"}} 1\n' in metrics.decode()
            assert user.encode() not in metrics and user.encode() not in debug
            assert user not in "".join(service.lines)
    finally:
        service.stop()
