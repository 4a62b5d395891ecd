"""A real PostgreSQL (Debian's `postgresql` package) for the tests of the shared ledger: a cluster
of its own made by initdb in a temporary directory, run as a non-root uid, reachable only on
127.0.0.1 at a port of its own with a password (scram-sha-256), its socket file in that directory,
fsync on. Started and stopped by PID; nothing else on the machine is touched."""
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from conftest import free_port, need

BIN = "/usr/lib/postgresql/15/bin"
# PostgreSQL refuses to run as root, and initdb looks its uid up in the passwd database, where the
# Deployment's 65532 has no entry on a test machine: `nobody` has one everywhere and owns nothing.
OWNER = "nobody"
USER = "usage_tracking"
# initdb writes and syncs a whole cluster (a few seconds on a busy 2-core machine); starting also
# covers crash recovery after stop("immediate").
START_SECONDS = 60
# pg_ctl's signals: a fast stop rolls back open transactions and checkpoints, an immediate one
# exits at once and leaves recovery to the next start (a crash, as far as the data is concerned).
STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
# psql's separators in unaligned output: characters no test value contains.
FIELD, RECORD = "\x1f", "\x1e"


class PostgresServer:
    """One cluster; `start()` it, `psql()` into it, `stop()` or `close()` it."""

    def __init__(self):
        if not os.access(os.path.join(BIN, "initdb"), os.X_OK):
            pytest.fail(f"PostgreSQL is not installed ({BIN}/initdb is missing); Tests/run-suite installs "
                        "Debian's postgresql package")
        # As root, drop to the Deployment's uid; as anyone else, the cluster is the caller's own.
        owner = pwd.getpwnam(OWNER) if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
        self.uid, self.gid = owner.pw_uid, owner.pw_gid
        self.as_owner = ([need("setpriv"), f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--"]
                         if os.geteuid() == 0 else [])
        self.user, self.password = USER, secrets.token_urlsafe(24)
        self.port = free_port()
        self.process = None
        self.directory = tempfile.mkdtemp(prefix="postgres-")
        os.chown(self.directory, self.uid, self.gid)
        self.data = os.path.join(self.directory, "data")
        self.log_path = os.path.join(self.directory, "postgres.log")
        self._initdb()

    def _initdb(self):
        # initdb reads the superuser's password from a file, which is gone before the server starts.
        secret = os.path.join(self.directory, "initdb-password")
        with open(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(self.password)
        os.chown(secret, self.uid, self.gid)
        try:
            result = subprocess.run(
                [*self.as_owner, os.path.join(BIN, "initdb"), "-D", self.data, "-U", self.user, f"--pwfile={secret}",
                 "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"],
                cwd=self.directory, env=self._env(), capture_output=True, text=True, timeout=START_SECONDS)
        finally:
            os.unlink(secret)
        if result.returncode != 0:
            pytest.fail(f"initdb failed:\n{result.stdout}{result.stderr}")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"""
listen_addresses = '127.0.0.1'
port = {self.port}
unix_socket_directories = '{self.directory}'
password_encryption = 'scram-sha-256'
fsync = on
synchronous_commit = on
full_page_writes = on
max_connections = 50
shared_buffers = 16MB
logging_collector = off
""")
        # Only password logins over loopback TCP, and over the socket file for the owner's tools.
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as f:
            f.write("local all all scram-sha-256\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n")

    @staticmethod
    def _env():
        return {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC"}

    def start(self):
        """Starts the postmaster and returns once it accepts a password login, within START_SECONDS."""
        assert self.process is None or self.process.poll() is not None, "already running"
        log = open(self.log_path, "a")
        try:
            # setpriv execs the server, so the PID is the postmaster's own.
            self.process = subprocess.Popen([*self.as_owner, os.path.join(BIN, "postgres"), "-D", self.data],
                                            cwd=self.directory, env=self._env(), stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        deadline = time.time() + START_SECONDS
        while time.time() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"postgres exited with {self.process.returncode}:\n{self.log()}")
            if self._run_psql("SELECT 1", "postgres", self.password).returncode == 0:
                return self
            time.sleep(0.2)
        self.stop("immediate")
        pytest.fail(f"postgres did not accept a login within {START_SECONDS} s:\n{self.log()}")

    def stop(self, mode="fast"):
        """Stops the postmaster by its PID with pg_ctl's signal for `mode`; SIGKILL past 60 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(STOP_SIGNALS[mode])
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self, mode="fast"):
        self.stop(mode)
        return self.start()

    def close(self):
        self.stop("fast")
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def pid(self):
        return self.process.pid if self.process and self.process.poll() is None else None

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def _run_psql(self, sql, database, password):
        # The password goes in the environment only: never on a command line, never printed.
        return subprocess.run(
            [os.path.join(BIN, "psql"), "-X", "-w", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-F", FIELD, "-R", RECORD,
             "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", database, "-c", sql],
            env={**self._env(), "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "5"},
            capture_output=True, text=True, timeout=60)

    def psql(self, sql, database="postgres", password=None):
        """The rows `sql` returns, each a tuple of strings (NULL as ""); raises with psql's message on error."""
        result = self._run_psql(sql, database, self.password if password is None else password)
        if result.returncode != 0:
            raise PsqlError(result.stderr.strip())
        text = result.stdout.rstrip("\n")
        return [tuple(record.split(FIELD)) for record in text.split(RECORD)] if text else []

    def create_database(self, name):
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"not a plain database name: {name!r}")
        self.psql(f"CREATE DATABASE {name}")
        return name

    def url(self, database):
        """The service's --ledger-url: no password in it."""
        return f"postgres://{self.user}@127.0.0.1:{self.port}/{database}"

    def password_file(self, path, owner=None):
        """Writes the password to `path` (mode 0600, no newline, as a Secret key mounts it) for
        --ledger-password-file; `owner` is a (uid, gid) to hand it to. Returns the path."""
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(self.password)
        if owner:
            os.chown(path, *owner)
        return str(path)


class PsqlError(Exception):
    """psql's own message (its stderr), which never contains the password."""
