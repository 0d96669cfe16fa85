"""A local 3-master Redis Cluster for the tests, from the installed `redis-server` (no Docker).

    with local_cluster() as url:   # "redis://127.0.0.1:<port>/0", any node of the cluster
        ...

Three `redis-server --cluster-enabled yes` processes on free ports, in a temporary directory (no
persistence), joined with `redis-cli --cluster create ... --cluster-yes`; ready once every node reports
`cluster_state:ok` and knows all three masters. Torn down (processes stopped, directory removed) on exit.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


class ClusterUnavailable(RuntimeError):
    pass


def _free_port() -> int:
    # A cluster node also listens on port + 10000 (the cluster bus): both must be free.
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise ClusterUnavailable("no free port pair for a cluster node")


def _cli(port: int, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout


def _ready(ports: list[int]) -> bool:
    for port in ports:
        info = _cli(port, "cluster", "info")
        if "cluster_state:ok" not in info or "cluster_known_nodes:3" not in info:
            return False
    return True


@contextlib.contextmanager
def local_cluster(masters: int = 3, timeout: float = 60.0) -> Iterator[str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise ClusterUnavailable("redis-server and redis-cli are needed for a local Redis Cluster")
    workdir = Path(tempfile.mkdtemp(prefix="redis-cluster-"))
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for _ in range(masters):
            port = _free_port()
            node_dir = workdir / str(port)
            node_dir.mkdir()
            procs.append(
                subprocess.Popen(
                    [
                        server,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "5000",
                        "--dir",
                        str(node_dir),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--protected-mode",
                        "no",
                        "--maxclients",
                        "10000",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            ports.append(port)
        deadline = time.monotonic() + timeout
        for port in ports:
            while True:
                try:
                    if _cli(port, "ping").strip() == "PONG":
                        break
                except subprocess.CalledProcessError:
                    pass
                if time.monotonic() > deadline:
                    raise ClusterUnavailable(f"cluster node on port {port} did not start")
                time.sleep(0.05)
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        while not _ready(ports):
            if time.monotonic() > deadline:
                raise ClusterUnavailable("the local Redis Cluster never reached cluster_state:ok")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
