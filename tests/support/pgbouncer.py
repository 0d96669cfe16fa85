"""A local PgBouncer in transaction mode in front of the test PostgreSQL, from the installed `pgbouncer`.

    with local_pgbouncer() as port:   # postgresql://postgres@127.0.0.1:<port>/<any database>
        ...

Every database name is forwarded to PostgreSQL on 127.0.0.1:5432 as user postgres, with at most
`server_pool_size` server connections per database however many clients connect.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


class PgBouncerUnavailable(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_pgbouncer(
    pg_host: str = "127.0.0.1", pg_port: int = 5432, server_pool_size: int = 4
) -> Iterator[int]:
    binary = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
    )
    if binary is None:
        raise PgBouncerUnavailable("pgbouncer is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    port = _free_port()
    config = workdir / "pgbouncer.ini"
    config.write_text(
        f"""[databases]
* = host={pg_host} port={pg_port} user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = {server_pool_size}
max_client_conn = 1000
logfile = {workdir}/pgbouncer.log
pidfile = {workdir}/pgbouncer.pid
ignore_startup_parameters = extra_float_digits,options,statement_timeout,application_name
"""
    )
    command = [binary, str(config)]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        shutil.chown(workdir, "postgres")
        command = [binary, "-u", "postgres", str(config)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None:
                raise PgBouncerUnavailable(
                    f"pgbouncer exited: {proc.stderr.read().decode() if proc.stderr else ''}"
                )
            if time.monotonic() > deadline:
                raise PgBouncerUnavailable("pgbouncer did not start")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
