"""Deploy/Containerfile's binary, run the way Deploy/deployment.yaml runs it, as far as this
machine allows without a container engine: the same static release build, as the Deployment's
uid and gid with no capabilities and no new privileges, on a read-only root filesystem (a private
mount namespace with / remounted read-only), with the ConfigMap's settings as its only environment
and the callback secret as a file in a directory of its own.

Tests/run-suite builds the binary once (`--scratch-path .build-static`) and names it in
USAGE_TRACKING_STATIC_BINARY."""
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time

import pytest

from conftest import ROOT, Service, kustomize_objects, need, one, request

STATIC = os.environ.get("USAGE_TRACKING_STATIC_BINARY",
                        os.path.join(ROOT, ".build-static", "release", "usage-tracking"))
SECRET = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"


def deployment_pod():
    return one(kustomize_objects(), "Deployment")["spec"]["template"]["spec"]


def sandbox(pod=None, volume=None):
    """The command prefix: a private mount namespace, / read-only in it, then the pod's user.
    `volume` (host directory, mount path) mounts a writable directory there first, as a
    PersistentVolumeClaim is mounted: the mount path's parent is covered by an empty tmpfs in
    the namespace (so the mount point can be made without touching the machine's own), and the
    directory is bind-mounted on it, a mount of its own that stays writable when / turns read-only."""
    pod = pod or deployment_pod()
    user, group = pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    container = pod["containers"][0]["securityContext"]
    # What the prefix reproduces; if the Deployment changes these, this must change too.
    assert container == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                         "capabilities": {"drop": ["ALL"]}}
    assert pod["securityContext"]["runAsNonRoot"] is True and user != 0
    drop = (f'exec {need("setpriv")} --reuid={user} --regid={group} --clear-groups --inh-caps=-all '
            '--bounding-set=-all --no-new-privs -- "$@"')
    mounts = ""
    if volume is not None:
        source, target = map(shlex.quote, volume)
        parent = shlex.quote(os.path.dirname(volume[1]))
        mounts = f"mount -t tmpfs -o mode=0755 tmpfs {parent} && mkdir {target} && mount --bind {source} {target} && "
    return [need("unshare"), "--mount", "--propagation", "private", "sh", "-c",
            mounts + "mount -o remount,bind,ro / && " + drop, "sandbox"]


def test_sandbox_is_what_the_deployment_asks_for():
    """The prefix itself: the uid, no capabilities, no new privileges, and no writable root."""
    script = ("grep -E '^(Uid|Gid|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status; "
              "touch /tmp/usage-tracking-probe 2>&1; touch /usage-tracking-probe 2>&1; true")
    result = subprocess.run([*sandbox(), "sh", "-c", script], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    status = dict(re.findall(r"^(\w+):\s+(.*)$", result.stdout, re.M))
    assert status["Uid"].split() == ["65532"] * 4 and status["Gid"].split() == ["65532"] * 4
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[capabilities], 16) == 0, capabilities
    assert status["NoNewPrivs"] == "1"
    # /tmp is world-writable on this machine: only a read-only root refuses it.
    assert result.stdout.count("Read-only file system") == 2, result.stdout
    assert not os.path.exists("/tmp/usage-tracking-probe")


def test_static_binary_needs_only_what_the_runtime_image_installs():
    if not os.access(STATIC, os.X_OK):
        pytest.fail(f"{STATIC} not built; Tests/run-suite builds it")
    libraries = set(re.findall(r"^\s*(\S+?)(?:\.so[.\d]*)? ", subprocess.run(
        [need("ldd"), STATIC], capture_output=True, text=True, check=True).stdout, re.M))
    # glibc (libc, libm, the loader), libstdc++6 (with libgcc_s), zlib1g and libsqlite3-0 (the
    # ledger): the Containerfile's list.
    assert libraries <= {"linux-vdso", "libc", "libm", "libstdc++", "libgcc_s", "libz", "libsqlite3",
                         "/lib64/ld-linux-x86-64"}, libraries
    assert "libsqlite3" in libraries
    with open(os.path.join(ROOT, "Deploy", "Containerfile")) as f:
        assert "apt-get install -y --no-install-recommends libstdc++6 zlib1g libsqlite3-0" in f.read()


@contextlib.contextmanager
def mounted_config(objects):
    """The ConfigMap's settings as the container gets them, with the files they name written
    where the pod mounts them (the callback secret, the metering config)."""
    config = dict(one(objects, "ConfigMap")["data"])
    # The Secret as Kubernetes mounts it: a directory and a file anyone may read, owned by root
    # (pytest's tmp_path is private to root, so not there).
    mounted = tempfile.mkdtemp(prefix="usage-tracking-secret-")
    try:
        secret = os.path.join(mounted, "secret")
        with open(secret, "w") as f:
            f.write(SECRET)
        os.chmod(mounted, 0o755)
        os.chmod(secret, 0o644)
        assert os.path.basename(config["USAGE_TRACKING_CALLBACK_SECRET_FILE"]) == "secret"
        config["USAGE_TRACKING_CALLBACK_SECRET_FILE"] = secret
        # The metering config as the ConfigMap volume mounts it; envFrom skips its key.
        metering = os.path.join(mounted, "config.yaml")
        with open(metering, "w") as f:
            f.write(config.pop("config.yaml"))
        os.chmod(metering, 0o644)
        config["USAGE_TRACKING_CONFIG"] = metering
        yield config
    finally:
        shutil.rmtree(mounted)


@pytest.fixture
def contained():
    """The static binary in the sandbox, configured by the ConfigMap alone."""
    if not os.access(STATIC, os.X_OK):
        pytest.fail(f"{STATIC} not built; Tests/run-suite builds it")
    with mounted_config(kustomize_objects()) as config:
        service = Service(binary=STATIC, wrapper=sandbox(), env={"PATH": "/usr/bin:/bin", **config})
        yield service, config
        # SIGKILL: a SIGTERM would wait out the ConfigMap's 25 s drain delay.
        service.process.kill()
        service.process.wait()


def test_static_binary_serves_as_the_deployment_runs_it(contained):
    service, config = contained
    with open(f"/proc/{service.process.pid}/status") as f:
        status = dict(re.findall(r"^(\w+):\s+(.*)$", f.read(), re.M))
    assert status["Uid"].split()[0] == "65532" and int(status["CapEff"], 16) == 0  # the server itself

    assert request(service.port, "GET", "/healthz")[::2] == (200, b"ok\n")
    assert request(service.port, "GET", "/readyz")[::2] == (200, b"ready\n")
    body = b'{"user":"alice","groups":"premium","path":"/v1/completions"}'
    json = {"Content-Type": "application/json"}
    assert request(service.port, "POST", "/track", body, {**json, "Authorization": f"Bearer {SECRET}"})[0] == 202
    assert request(service.port, "POST", "/track", body, json)[0] == 401
    assert request(service.port, "POST", "/track", body, {**json, "Authorization": "Bearer wrong"})[0] == 401
    status, _, metrics = request(service.port, "GET", "/metrics")
    assert status == 200
    text = metrics.decode()
    # The ConfigMap's new-series hold (30 s) shows a new series as 0 first, so increase() sees it.
    assert int(config["USAGE_TRACKING_NEW_SERIES_HOLD"]) == 30
    assert 'llm_requests_total{user="alice",groups="premium",path="/v1/completions"} 0\n' in text
    assert 'usage_tracking_callbacks_total{outcome="unauthorized"} 2\n' in text
    log = "".join(service.lines)
    assert '"level":"warning"' not in log and '"level":"error"' not in log, log

    # SIGTERM: the ConfigMap's drain delay keeps it serving with /readyz at 503.
    assert int(config["USAGE_TRACKING_DRAIN_DELAY"]) >= 5
    service.process.send_signal(signal.SIGTERM)
    deadline = time.time() + 3
    while request(service.port, "GET", "/readyz")[0] != 503:
        assert time.time() < deadline, "/readyz did not turn 503 after SIGTERM"
        time.sleep(0.05)
    assert request(service.port, "GET", "/healthz")[0] == 200


def ledger_objects():
    """The base with Deploy/examples/ledger, from an overlay as README shows it."""
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, "kustomization.yaml"), "w") as f:
            f.write(f"resources:\n  - {os.path.relpath(os.path.join(ROOT, 'Deploy'), directory)}\n"
                    f"components:\n  - {os.path.relpath(os.path.join(ROOT, 'Deploy', 'examples', 'ledger'), directory)}\n")
        return kustomize_objects(directory)


def test_static_binary_keeps_its_ledger_as_the_statefulset_runs_it():
    """The ledger Component's pod: the StatefulSet's user, read-only root, the ConfigMap's
    settings (state dir and fsync=always included) and a volume owned by the pod's group at the
    state dir. It counts a callback on disk, exits on SIGTERM, and the next pod restores it."""
    if not os.access(STATIC, os.X_OK):
        pytest.fail(f"{STATIC} not built; Tests/run-suite builds it")
    objects = ledger_objects()
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    state = one(objects, "ConfigMap")["data"]["USAGE_TRACKING_STATE_DIR"]
    assert one(objects, "ConfigMap")["data"]["USAGE_TRACKING_FSYNC"] == "always"
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "ledger")
    assert mount["mountPath"] == state and not mount.get("readOnly", False)
    user, group = pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"]
    # The claim as fsGroup leaves it: the pod's group owns it and may write in it.
    volume = tempfile.mkdtemp(prefix="usage-tracking-ledger-")
    os.chown(volume, 0, group)
    os.chmod(volume, 0o2770)
    body = b'{"user":"alice","groups":"premium","path":"/v1/completions"}'
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}", "x-request-id": "statefulset-1"}
    try:
        with mounted_config(objects) as config:
            def start():
                return Service(binary=STATIC, wrapper=sandbox(pod, (volume, state)), env={"PATH": "/usr/bin:/bin", **config})

            service = start()
            try:
                assert request(service.port, "GET", "/readyz")[::2] == (200, b"ready\n")
                assert request(service.port, "POST", "/track", body, headers)[0] == 202
                # fsync=always: on disk once acknowledged (in the journal), and in the database within
                # the journal's fold (a second), in the files the pod's user owns.
                def in_database():
                    connection = sqlite3.connect(f"file:{volume}/usage.sqlite?mode=ro", uri=True)
                    try:
                        return connection.execute("SELECT labels, total FROM series WHERE labels LIKE '%alice%'").fetchall()
                    finally:
                        connection.close()
                deadline = time.time() + 5
                while not in_database() and time.time() < deadline:
                    time.sleep(0.05)
                assert in_database() == [('{"user":"alice","groups":"premium","path":"/v1/completions"}', 1)]
                assert all(os.stat(os.path.join(volume, name)).st_uid == user for name in ("usage.journal-0", "usage.journal-1"))
                assert os.stat(os.path.join(volume, "usage.sqlite")).st_uid == user
                # The pod's end: SIGTERM, the drain (cut short by a second one), every count committed.
                service.process.send_signal(signal.SIGTERM)
                deadline = time.time() + 5
                while request(service.port, "GET", "/readyz")[0] != 503:
                    assert time.time() < deadline, "/readyz did not turn 503 after SIGTERM"
                    time.sleep(0.05)
                service.process.send_signal(signal.SIGTERM)
                assert service.process.wait(timeout=20) == 0
            finally:
                service.process.kill()
                service.process.wait()
            assert sorted(os.listdir(volume)) == ["usage.lock", "usage.sqlite"]

            service = start()
            try:
                restored = next(json.loads(line) for line in service.lines if '"msg":"ledger restored"' in line)
                assert (restored["file"], restored["series"], restored["request_ids"], restored["fsync"]) == (
                    f"{state}/usage.sqlite", "1", "1", "always")
                metrics = request(service.port, "GET", "/metrics")[2].decode()
                # Restored, so shown at once: the new-series hold is for series Prometheus never saw.
                assert 'llm_requests_total{user="alice",groups="premium",path="/v1/completions"} 1\n' in metrics
                assert 'usage_tracking_callbacks_total{outcome="accepted"} 1\n' in metrics
                assert request(service.port, "POST", "/track", body, headers)[0] == 202  # the same id: a repeat
                assert 'usage_tracking_callbacks_total{outcome="duplicate"} 1\n' in request(service.port, "GET", "/metrics")[2].decode()
                log = "".join(service.lines)
                assert '"level":"error"' not in log and '"level":"critical"' not in log, log
            finally:
                service.process.kill()
                service.process.wait()
    finally:
        shutil.rmtree(volume)
