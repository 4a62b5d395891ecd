"""What an operator reads before deploying: the licence and the version, which must be the same
string everywhere it is shown."""
import hashlib
import json
import os
import re
import subprocess

from conftest import README, ROOT, Service, kustomize_objects, one, request

# SHA-256 of the Apache License 2.0 as published at https://www.apache.org/licenses/LICENSE-2.0.txt
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_licence_is_the_apache_2_text_and_readme_says_so():
    with open(os.path.join(ROOT, "LICENSE"), "rb") as f:
        text = f.read()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_SHA256
    with open(README) as f:
        readme = f.read()
    assert "[Apache License 2.0](LICENSE)" in readme


def test_version_is_one_string_everywhere():
    with open(os.path.join(ROOT, "Sources", "UsageTrackingCore", "Counting", "UsageMetrics.swift")) as f:
        defined = re.findall(r'static let version = "([^"]+)"', f.read())
    assert len(defined) == 1 and re.fullmatch(r"\d+\.\d+\.\d+", defined[0]), defined
    version = defined[0]

    service = Service()
    try:
        printed = subprocess.run([service.binary, "--version"], capture_output=True, text=True, check=True)
        assert printed.stdout == version + "\n"
        status, _, body = request(service.port, "GET", "/metrics")
        assert status == 200
        labels = re.findall(r'^usage_tracking_build_info\{version="([^"]*)",swift="[^"]*"\} 1$', body.decode(), re.M)
        assert labels == [version]
        status, _, body = request(service.port, "GET", "/debug")
        assert status == 200 and json.loads(body)["version"] == version
    finally:
        service.stop()

    containers = one(kustomize_objects(), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["image"].rsplit(":", 1)[1] for c in containers] == [version]


def test_readme_states_the_swift_tools_the_package_declares():
    with open(os.path.join(ROOT, "Package.swift")) as f:
        tools = re.match(r"// swift-tools-version:(\d+\.\d+)\n", f.read()).group(1)
    with open(README) as f:
        readme = f.read()
    assert f"needs the Swift {tools} tools or newer" in readme
    assert "It runs on Linux only" in readme and "Tokens come from the model's answer, which Authorino's callback" in readme
