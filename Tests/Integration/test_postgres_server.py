"""The PostgreSQL harness itself (postgres_server.py): a real server, as the shared-ledger tests
get it from conftest's `postgres` fixture."""
import os
import socket
import stat
import subprocess

import pytest

from postgres_server import BIN, PsqlError


def test_answers_a_password_login_with_what_was_stored(postgres):
    postgres.psql("CREATE TABLE round_trip (id integer PRIMARY KEY, note text)")
    try:
        postgres.psql("INSERT INTO round_trip VALUES (1, 'it''s ünïcode, with | and tabs\t'), (2, NULL)")
        assert postgres.psql("SELECT id, note FROM round_trip ORDER BY id") == [
            ("1", "it's ünïcode, with | and tabs\t"), ("2", "")]
        assert postgres.psql("SELECT id FROM round_trip WHERE id > 2") == []
    finally:
        postgres.psql("DROP TABLE round_trip")
    with pytest.raises(PsqlError, match='relation "round_trip" does not exist'):
        postgres.psql("SELECT * FROM round_trip")


def test_is_debians_postgresql_15_with_fsync_and_scram(postgres):
    [(version,)] = postgres.psql("SHOW server_version")
    assert version.startswith("15.")
    settings = dict(postgres.psql("SELECT name, setting FROM pg_settings WHERE name IN "
                                  "('fsync', 'synchronous_commit', 'password_encryption', 'listen_addresses', "
                                  "'unix_socket_directories', 'port')"))
    assert settings == {"fsync": "on", "synchronous_commit": "on", "password_encryption": "scram-sha-256",
                        "listen_addresses": "127.0.0.1", "unix_socket_directories": postgres.directory,
                        "port": str(postgres.port)}
    # The role's stored password is a SCRAM verifier, not the password.
    [(verifier,)] = postgres.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{postgres.user}'")
    assert verifier.startswith("SCRAM-SHA-256$") and postgres.password not in verifier


@pytest.mark.parametrize("password,message", [
    ("not-the-password", 'password authentication failed for user "usage_tracking"'),
    ("", "fe_sendauth: no password supplied"),
])
def test_refuses_a_wrong_or_missing_password(postgres, password, message):
    with pytest.raises(PsqlError, match=message) as refused:
        postgres.psql("SELECT 1", password=password)
    assert postgres.password not in str(refused.value)
    assert postgres.password not in postgres.log()


def test_url_and_password_file_log_a_real_client_in(postgres, tmp_path):
    database = postgres.create_database("url_check")
    url = postgres.url(database)
    assert url == f"postgres://usage_tracking@127.0.0.1:{postgres.port}/url_check"
    assert postgres.password not in url
    path = postgres.password_file(tmp_path / "password")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as f:
        assert f.read() == postgres.password  # no newline, as a Secret's key is mounted
    # libpq takes the URL as it is; the password comes from the file, not the URL.
    with open(path) as f:
        result = subprocess.run([os.path.join(BIN, "psql"), "-X", "-w", "-A", "-t", "-d", url, "-c",
                                 "SELECT current_database(), current_user"],
                                env={"PATH": "/usr/bin:/bin", "PGPASSWORD": f.read()}, capture_output=True, text=True,
                                timeout=30)
    assert (result.returncode, result.stdout) == (0, "url_check|usage_tracking\n"), result.stderr
    assert ("url_check",) in postgres.psql("SELECT datname FROM pg_database")
    with pytest.raises(ValueError, match="not a plain database name"):
        postgres.create_database("x; DROP DATABASE postgres")


def refused(port):
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_stop_and_start_keep_committed_data(postgres, mode):
    """`immediate` is a crash for the data: what was committed comes back through WAL recovery."""
    postgres.psql("CREATE TABLE IF NOT EXISTS kept (mode text, n integer)")
    postgres.psql(f"INSERT INTO kept SELECT '{mode}', n FROM generate_series(1, 1000) AS n")
    pid = postgres.pid
    postgres.stop(mode)
    assert postgres.pid is None and not os.path.exists(f"/proc/{pid}") and refused(postgres.port)
    with pytest.raises(PsqlError, match="Connection refused"):
        postgres.psql("SELECT 1")
    postgres.start()
    assert postgres.pid != pid
    assert postgres.psql(f"SELECT count(*), sum(n) FROM kept WHERE mode = '{mode}'") == [("1000", "500500")]
    # restart() is stop and start on the same port and data.
    postgres.restart(mode)
    assert postgres.psql(f"SELECT count(*) FROM kept WHERE mode = '{mode}'") == [("1000",)]


def own_sockets(pid):
    """Socket inodes of a process and its children (the postmaster's backends share its listeners)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def tcp_listeners(table):
    """(address, port, inode) of each listening socket in /proc/net/tcp or tcp6."""
    found = []
    with open(f"/proc/net/{table}") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] == "0A":  # TCP_LISTEN
                found.append((address, int(port, 16), fields[9]))
    return found


def test_listens_only_on_loopback_and_its_own_socket_file(postgres):
    inodes = own_sockets(postgres.pid)
    ipv4 = [(a, p) for a, p, inode in tcp_listeners("tcp") if inode in inodes]
    ipv6 = [(a, p) for a, p, inode in tcp_listeners("tcp6") if inode in inodes]
    assert ipv4 == [("0100007F", postgres.port)] and ipv6 == []  # 127.0.0.1, little-endian
    with open("/proc/net/unix") as f:
        paths = [line.split()[7] for line in f.readlines()[1:] if len(line.split()) == 8 and line.split()[6] in inodes]
    assert paths == [os.path.join(postgres.directory, f".s.PGSQL.{postgres.port}")]
    assert not os.path.exists(f"/var/run/postgresql/.s.PGSQL.{postgres.port}")


def process_ids(status):
    return {key: value.split() for key, value in (line.split(":", 1) for line in status.splitlines())
            if key in ("Uid", "Gid", "Groups")}


def test_runs_as_a_non_root_user_that_owns_the_cluster(postgres):
    pids = [postgres.pid] + [int(p) for p in open(f"/proc/{postgres.pid}/task/{postgres.pid}/children").read().split()]
    assert len(pids) > 1  # the postmaster and its background processes
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            ids = process_ids(f.read())
        assert ids["Uid"] == [str(postgres.uid)] * 4 and ids["Gid"] == [str(postgres.gid)] * 4, (pid, ids)
        assert ids["Groups"] == []
    assert postgres.uid != 0 and postgres.gid != 0
    data = os.stat(postgres.data)
    assert (data.st_uid, data.st_gid, stat.S_IMODE(data.st_mode)) == (postgres.uid, postgres.gid, 0o700)
