"""The whole replica set-up on loopback: PostgreSQL, N nodes, HAProxy in front (docs/replicas.md).

    python -m deploy.cluster start DIR --nodes 3 --citizens 20000   # prints the front's address, JSON
    python -m deploy.cluster status DIR
    python -m deploy.cluster stop DIR

(``deploy/cluster.sh`` is the same.) Everything lives under DIR: ``pg/`` (a throwaway
PostgreSQL from scripts/pg_test_server.sh), ``node<i>/`` (each node's data directory: its
snapshot, model registry), ``audit/`` (the one audit directory every node writes its segments
to, so "who checked me" is complete whichever node served), ``keys.env`` (the two keys every
node of one city shares), ``haproxy.cfg`` (from deploy/haproxy.cfg.in) and ``cluster.json``
(ports and pids). The first node seeds the empty store with a synthetic city and calibrates
the model; the others start with its model registry, so all serve one release. HAProxy is
Debian's package: installed with apt-get when missing and we are root (``QJ_NO_INSTALL=1``
turns that off), as scripts/pg_test_server.sh does for PostgreSQL.

The same class drives the tests (tests/test_replica*.py) and ``python -m
loadtest.cluster_bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PG_SCRIPT = ROOT / "scripts" / "pg_test_server.sh"
TEMPLATE = Path(__file__).resolve().parent / "haproxy.cfg.in"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_binary(install: bool = True) -> str | None:
    """The haproxy command; installed with apt-get (Debian's package) when missing, if we are
    root and may (``QJ_NO_INSTALL`` unset). None when there is none."""
    found = shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy") or None
    if found or not install or os.environ.get("QJ_NO_INSTALL") == "1" or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "Dpkg::Options::=--force-confdef",
           "-o", "Dpkg::Options::=--force-confold", "haproxy"]
    if subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdin=subprocess.DEVNULL, capture_output=True)
        subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True)
    return shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy") or None


def health_check_bytes() -> bytes:
    """What the front's tcp-check sends a node (deploy/haproxy.cfg.in): grpc.health.v1
    Health/Check of service "" over cleartext HTTP/2 (prior knowledge), as bytes: the
    connection preface, an empty SETTINGS frame, a HEADERS frame (END_HEADERS; HPACK:
    :method POST and :scheme http from the static table, :authority, :path, content-type
    and te as literals without indexing or Huffman) and a DATA frame (END_STREAM) holding the empty
    request message (5 bytes of gRPC framing)."""
    def literal(text: str) -> bytes:
        raw = text.encode()
        return bytes([len(raw)]) + raw

    block = (bytes([0x83, 0x86, 0x01]) + literal("qianjiang") + bytes([0x04]) + literal("/grpc.health.v1.Health/Check")
             + bytes([0x0F, 0x10])
             + literal("application/grpc") + bytes([0x00]) + literal("te") + literal("trailers"))

    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

    return (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + frame(1, 4, 1, block)
            + frame(0, 1, 1, bytes(5)))


def health(target: str, service: str = "", timeout: float = 1.0) -> str:
    """grpc.health.v1 status of ``target`` ("UNREACHABLE" when it does not answer)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class Cluster:
    """PostgreSQL, ``nodes`` replicas and HAProxy under ``root`` (module docstring)."""

    def __init__(self, root: Path, nodes: int = 3, workers: int = 1, citizens: int = 20_000,
                 max_lag: float = 1.0, maxconn: int = 64, queue: int = 64, dsn: str | None = None,
                 extra_args: tuple[str, ...] = (), snapshot_interval: float = 30.0):
        self.root = Path(root).resolve()
        self.n, self.workers, self.citizens, self.max_lag = nodes, workers, citizens, max_lag
        self.maxconn, self.queue = maxconn, queue
        self.extra_args = tuple(extra_args)
        self.snapshot_interval = snapshot_interval
        self.dsn = dsn  # a store given (tests: a database of the session's server); else our own
        self._own_pg = dsn is None
        self.ports: list[int] = []
        self.procs: dict[int, subprocess.Popen] = {}
        self.front_port = 0
        self.haproxy: subprocess.Popen | None = None
        self.root.mkdir(parents=True, exist_ok=True)

    # pieces --------------------------------------------------------------------------------

    @property
    def front(self) -> str:
        return f"127.0.0.1:{self.front_port}"

    def target(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    def workers_of(self, i: int) -> int:
        """Processes of node ``i`` (``workers``: one number for all, or one per node)."""
        return self.workers[i] if isinstance(self.workers, (list, tuple)) else self.workers

    def node_dir(self, i: int) -> Path:
        return self.root / f"node{i}"

    def _env(self) -> dict:
        keys = self.root / "keys.env"
        if not keys.exists():
            keys.write_text(f"QJ_CARD_KEY={secrets.token_hex(32)}\nQJ_AUDIT_KEY={secrets.token_hex(32)}\n")
            keys.chmod(0o600)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for line in keys.read_text().split():
            name, _, value = line.partition("=")
            env[name] = value
        return env

    def start_pg(self) -> str:
        if self.dsn is None:
            if os.geteuid() == 0:  # the server runs as "postgres" (scripts/pg_test_server.sh): let it in
                self.root.chmod(0o755)
            out = subprocess.run(["bash", str(PG_SCRIPT), "start", str(self.root / "pg")], capture_output=True,
                                 text=True, timeout=300)
            if out.returncode != 0:
                raise RuntimeError(f"PostgreSQL did not start: {out.stderr[-800:]}")
            self.dsn = out.stdout.strip()
        return self.dsn

    def start_node(self, i: int, wait: bool = True) -> subprocess.Popen:
        """Start node ``i`` (again: same port, same data directory: it comes back from its
        snapshot and catches up from the change log)."""
        while len(self.ports) <= i:
            self.ports.append(free_port())
        data = self.node_dir(i)
        if i > 0 and not (data / "models").exists() and (self.node_dir(0) / "models").exists():
            data.mkdir(mode=0o700, parents=True, exist_ok=True)  # one release for every node
            shutil.copytree(self.node_dir(0) / "models", data / "models")
            for cal in self.node_dir(0).glob("calibration-*.npz"):
                shutil.copy2(cal, data / cal.name)
        args = [sys.executable, "-m", "clients.cli", "serve", "--store", self.dsn, "--data-dir", str(data),
                "--port", str(self.ports[i]), "--metrics-port", "0", "--workers", str(self.workers_of(i)),
                "--replica", "--replica-max-lag", str(self.max_lag), "--audit-dir", str(self.root / "audit"),
                "--snapshot-interval", str(self.snapshot_interval),
                # offline gates' lists: node 0 publishes them, every node serves them
                "--gate-dir", str(self.root / "gate"), *([] if i == 0 else ["--gate-delta-interval", "0"]),
                *self.extra_args]
        if i == 0 and self.citizens:
            args += ["--seed-citizens", str(self.citizens)]
        log = open(self.root / f"node{i}.log", "a")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self._env(),
                                start_new_session=True)
        log.close()
        self.procs[i] = proc
        if wait:
            self.wait_serving(i)
        return proc

    def wait_serving(self, i: int, timeout: float = 180.0) -> float:
        t0 = time.monotonic()
        while health(self.target(i)) != "SERVING":
            proc = self.procs.get(i)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"node {i} exited ({proc.returncode}): {self.log_tail(i)}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"node {i} not SERVING after {timeout:.0f} s: {self.log_tail(i)}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def log_tail(self, i: int, n: int = 3000) -> str:
        path = self.root / f"node{i}.log"
        return path.read_text()[-n:] if path.exists() else ""

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get(i)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, sig)  # the node's whole process group: parent and workers
            proc.wait(60)

    def write_haproxy_config(self) -> Path:
        if not self.front_port:
            self.front_port = free_port()
        servers = "\n".join(f"    server node{i} 127.0.0.1:{port}" for i, port in enumerate(self.ports))
        text = (TEMPLATE.read_text().replace("@FRONT@", self.front).replace("@STATS@", str(self.root / "haproxy.sock"))
                .replace("@MAXCONN@", str(self.maxconn)).replace("@QUEUE@", str(self.queue))
                .replace("@SERVERS@", servers))
        path = self.root / "haproxy.cfg"
        path.write_text(text)
        return path

    def start_front(self) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("no haproxy (Debian: apt-get install haproxy)")
        config = self.write_haproxy_config()
        check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused {config}: {check.stdout[-1500:]}{check.stderr[-1500:]}")
        log = open(self.root / "haproxy.log", "a")
        self.haproxy = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        t0 = time.monotonic()
        while health(self.front) != "SERVING":
            if self.haproxy.poll() is not None:
                raise RuntimeError(f"haproxy exited: {(self.root / 'haproxy.log').read_text()[-1500:]}")
            if time.monotonic() - t0 > 30:
                raise TimeoutError("the front does not answer health SERVING")
            time.sleep(0.05)

    def haproxy_command(self, command: str) -> str:
        """A command on HAProxy's stats socket (e.g. "show stat")."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.root / "haproxy.sock"))
            s.sendall(command.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def servers_up(self) -> dict[str, str]:
        """Each node's status in the front ("UP", "DOWN", ...)."""
        lines = self.haproxy_command("show stat").splitlines()
        head = lines[0].lstrip("# ").split(",")
        up = {}
        for line in lines[1:]:
            row = dict(zip(head, line.split(",")))
            if row.get("pxname") == "grpc_nodes" and row.get("svname", "").startswith("node"):
                up[row["svname"]] = row["status"]
        return up

    # the whole ----------------------------------------------------------------------------

    def start(self, front: bool = True) -> "Cluster":
        self.start_pg()
        for i in range(self.n):
            self.start_node(i, wait=(i == 0))  # the first seeds and calibrates; the rest start beside each other
        for i in range(1, self.n):
            self.wait_serving(i)
        if front:
            self.start_front()
        self.save()
        return self

    def save(self) -> None:
        (self.root / "cluster.json").write_text(json.dumps({
            "front": self.front if self.front_port else None, "nodes": [self.target(i) for i in range(len(self.ports))],
            "dsn": self.dsn, "own_pg": self._own_pg,
            "pids": {str(i): p.pid for i, p in self.procs.items()},
            "haproxy": self.haproxy.pid if self.haproxy else None}))

    def stop(self) -> None:
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
            self.haproxy.wait(10)
        for i, proc in self.procs.items():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._own_pg:
            subprocess.run(["bash", str(PG_SCRIPT), "stop", str(self.root / "pg")], capture_output=True, timeout=120)


def _stop_saved(root: Path) -> None:
    saved = json.loads((root / "cluster.json").read_text())
    pids = [saved.get("haproxy")] + list(saved.get("pids", {}).values())
    for pid in pids:
        if pid:
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 60
    for pid in pids:
        while pid and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    if saved.get("own_pg"):
        subprocess.run(["bash", str(PG_SCRIPT), "stop", str(root / "pg")], timeout=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.cluster", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["start", "stop", "status"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="processes per node")
    ap.add_argument("--citizens", type=int, default=20_000, help="the synthetic city the first node seeds")
    ap.add_argument("--max-lag", type=float, default=1.0, help="each node's staleness bound (seconds)")
    ap.add_argument("--maxconn", type=int, default=64, help="calls HAProxy sends one node at once")
    ap.add_argument("--queue", type=int, default=64, help="calls waiting in the front before RESOURCE_EXHAUSTED")
    ap.add_argument("--store", default=None, help="an existing PostgreSQL DSN (default: a throwaway one in DIR/pg)")
    args = ap.parse_args(argv)
    root = args.dir.resolve()
    if args.command == "stop":
        _stop_saved(root)
        return 0
    if args.command == "status":
        saved = json.loads((root / "cluster.json").read_text())
        saved["health"] = {t: health(t) for t in saved["nodes"] + ([saved["front"]] if saved["front"] else [])}
        print(json.dumps(saved))
        return 0
    cluster = Cluster(root, args.nodes, args.workers, args.citizens, args.max_lag, args.maxconn, args.queue, args.store)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    print(json.dumps({"front": cluster.front, "nodes": [cluster.target(i) for i in range(cluster.n)], "dsn": cluster.dsn}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
