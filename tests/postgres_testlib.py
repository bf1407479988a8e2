"""A throw-away PostgreSQL server on loopback for tests (Debian's `postgresql` package).

`local_server()` starts one in a temporary folder at a free port (as the `postgres` or
`nobody` user when run as root, which the server refuses) and removes it afterwards;
`new_database(port)` makes a fresh database and returns its DSN. Tests skip when the
server binaries are missing (`server_bin_dir() is None`).
"""

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

import psycopg
from multiprocess_testlib import free_port

_DATABASES = itertools.count()


def server_bin_dir():
    """The folder with `initdb` and `postgres` (newest Debian version first), or None."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2])
    )[::-1]
    if shutil.which("initdb"):
        candidates.append(os.path.dirname(shutil.which("initdb")))
    for directory in candidates:
        if all(os.access(os.path.join(directory, b), os.X_OK) for b in ("initdb", "postgres")):
            return directory
    return None


def dsn(port, dbname):
    """The libpq DSN of database `dbname` on the local server at `port`."""
    return f"host=127.0.0.1 port={port} user=evogrow dbname={dbname} connect_timeout=10"


@contextlib.contextmanager
def local_server():
    """Runs a PostgreSQL server on 127.0.0.1 for the context; yields its port."""
    bin_dir = server_bin_dir()
    assert bin_dir is not None, "PostgreSQL server binaries (initdb, postgres) not found"
    root = tempfile.mkdtemp(prefix="evogrow-pg-")
    as_user = {}
    if os.geteuid() == 0:  # postgres refuses to run as root
        names = [n for n in ("postgres", "nobody") if n in {u.pw_name for u in pwd.getpwall()}]
        user = pwd.getpwnam(names[0])
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "HOME": root}
    data = os.path.join(root, "data")
    initdb = [os.path.join(bin_dir, "initdb"), "-D", data, "-U", "evogrow", "--auth=trust"]
    initdb += ["-E", "UTF8", "--locale=C", "--no-sync"]
    subprocess.run(initdb, check=True, capture_output=True, env=env, cwd=root, **as_user)
    port = free_port()
    command = [os.path.join(bin_dir, "postgres"), "-D", data, "-h", "127.0.0.1"]
    command += ["-p", str(port), "-k", root, "-c", "fsync=off", "-c", "full_page_writes=off"]
    log_path = os.path.join(root, "server.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, **as_user
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(dsn(port, "postgres")).close()
                break
            except psycopg.OperationalError:
                assert process.poll() is None, open(log_path).read()
                assert time.monotonic() < deadline, open(log_path).read()
                time.sleep(0.1)
        yield port
    finally:
        process.send_signal(signal.SIGQUIT)  # immediate shutdown: nothing is kept
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(root, ignore_errors=True)


def new_database(port):
    """Creates a fresh database on the server at `port`; returns its DSN."""
    name = f"store_{os.getpid()}_{next(_DATABASES)}"
    with psycopg.connect(dsn(port, "postgres"), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return dsn(port, name)
