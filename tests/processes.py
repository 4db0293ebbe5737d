"""Real service processes for black-box tests: start on a free port, wait until ready, always stop.

Modelled on llama.cpp's server test utilities: a process that dies while we wait fails the test
at once with the tail of its log, instead of a timeout much later.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis

from tasks import keys
from tests.tls import CertAuthority

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """One child process with its log in a file. `prefix` goes before its command line: a
    launcher that runs it elsewhere, such as another host's namespaces (tests/netns.py)."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, prefix: Sequence[str] = ()
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")  # a restarted service appends to its log
        self.proc = subprocess.Popen(
            [*prefix, *argv],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches the pool children
        )

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if ready():
                    return
            except Exception:  # not up yet: connection refused and the like
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def start_or_stop(self, ready: Callable[[], bool], timeout: float) -> None:
        """wait_until, but a process that never became ready is stopped before the error rises."""
        try:
            self.wait_until(ready, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """SIGTERM goes to the main process only, as `docker stop` does (a Celery worker then
        shuts its pool down itself); SIGKILL, and whatever is left after `timeout`, hits the
        whole process group."""
        if self.proc.poll() is None:
            try:
                if sig == signal.SIGKILL:
                    os.killpg(self.proc.pid, sig)
                else:
                    self.proc.send_signal(sig)
                self.proc.wait(timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers: pool children, subprocesses
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()


# The users of a locked test Redis: the service's, confined to keys.acl_rules() (the README's
# minimal ACL), with which every service process connects, and an admin, with which the tests
# look into and manage Redis. The default user is off. One password each per test session, so a
# restarted Redis takes the same ones; tests grep logs and bodies for the service's.
SERVICE_USER = "llmq"
SERVICE_PASSWORD = f"pw-{secrets.token_hex(16)}"
ADMIN_USER = "llmq-admin"
ADMIN_PASSWORD = f"pw-{secrets.token_hex(16)}"


@functools.cache
def redis_version() -> tuple[int, ...]:
    """The installed redis-server's version, as (7, 0, 15)."""
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise RuntimeError(f"redis-server --version: {out!r}")
    return tuple(int(n) for n in match.groups())


def locked_args() -> list[str]:
    rules = keys.acl_rules(client_setinfo=redis_version() >= (7, 2))
    return [
        *keys.DEFAULT_USER_OFF,
        "--user", SERVICE_USER, "on", f">{SERVICE_PASSWORD}", *rules,
        "--user", ADMIN_USER, "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all",
    ]  # fmt: skip


def admin_url(url: str) -> str:
    """A locked Redis's URL (the service's) as its admin user; an open Redis's as it is."""
    parts = urlsplit(url)
    if parts.username != SERVICE_USER:
        return url
    return urlunsplit(parts._replace(netloc=f"{ADMIN_USER}:{ADMIN_PASSWORD}@{parts.netloc.split('@')[1]}"))


def redis_client(url: str, tls: CertAuthority | None = None, **options: object) -> redis.Redis:
    """A test's own client of a test Redis (TLS: trusting the test CA, showing its client
    certificate)."""
    return redis.Redis.from_url(url, **(tls.client_options() if tls else {}), **options)  # type: ignore[arg-type]


def acl_denials(url: str, tls: CertAuthority | None = None) -> list[dict[str, object]]:
    """What a locked Redis's ACL refused anyone since it started (ACL LOG), read as its admin."""
    return list(redis_client(admin_url(url), tls, decode_responses=True).acl_log())


def start_redis(
    log_dir: Path,
    port: int | None = None,
    conf: Path | None = None,
    args: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    locked: bool = True,
    tls: CertAuthority | None = None,
    prefix: Sequence[str] = (),
    name: str = "redis",
) -> tuple[Service, str]:
    """A redis-server on `host`:`port`; without `conf` it keeps nothing on disk, with one (the
    shipped redis.conf) it persists into `log_dir`, so a restart with the same arguments reloads
    it. `args`: more configuration, as redis-server takes it on its command line (`--user ...`);
    `locked`: the default user off, the service's and the admin's users on (locked_args), and the
    URL returned carries the service's; `tls`: TLS only (rediss://), with a certificate of the
    test CA `tls`, clients' certificates checked when given; `prefix`: as Service's."""
    port = port or free_port()
    persistence = ["--save", "", "--appendonly", "no"] if conf is None else ["--dir", str(log_dir)]
    listen = (
        ["--port", str(port)] if tls is None else ["--port", "0", "--tls-port", str(port), *tls.server_args()]
    )
    argv = ["redis-server", *([str(conf)] if conf else []), *listen, "--bind", host]
    users = locked_args() if locked else []
    svc = Service(name, [*argv, *persistence, *users, *args], {}, log_dir, prefix)
    auth = f"{SERVICE_USER}:{SERVICE_PASSWORD}@" if locked else ""
    url = f"{'rediss' if tls else 'redis'}://{auth}{host}:{port}/0"
    svc.start_or_stop(lambda: bool(redis_client(admin_url(url), tls).ping()), timeout=20)
    return svc, url


def start_worker(
    env: dict[str, str], log_dir: Path, name: str = "worker", prefix: Sequence[str] = ()
) -> Service:
    svc = Service(
        name,
        [str(BIN / "celery"), "-A", "tasks", "worker", "--loglevel=INFO", "-n", f"{name}@%h"],
        env,
        log_dir,
        prefix,
    )
    return svc


def start_api(
    env: dict[str, str],
    log_dir: Path,
    name: str = "api",
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    prefix: Sequence[str] = (),
) -> tuple[Service, str]:
    port = port or free_port()
    svc = Service(
        name,
        [str(BIN / "uvicorn"), "api.main:app", "--host", host, "--port", str(port)],
        env,
        log_dir,
        prefix,
    )
    url = f"http://{host}:{port}"
    # 401: the API is up and API_KEYS is set; 503: it is up and Redis is not (it lists models
    # from Redis).
    svc.start_or_stop(
        lambda: httpx.get(f"{url}/v1/models", timeout=1).status_code in (200, 401, 503), timeout=30
    )
    return svc, url


def wait_healthy(api: Service, url: str, timeout: float) -> None:
    api.wait_until(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, timeout=timeout)


# --- A replicated Redis under Sentinel ---------------------------------------------------------
# Two data nodes (a master and its replica) and three sentinels, as docs/operations.md's "Redis
# high availability" describes: every node has the locked users above and, for replication and
# the sentinels' monitoring, HA_USER (Redis's documented minimal rules for both); the sentinels
# have their own ACL: the service's user with keys.sentinel_acl_rules(), and an admin, as which
# they also talk to each other and the tests ask them.
SENTINEL_MASTER = "mymaster"
HA_USER = "llmq-ha"
HA_PASSWORD = f"pw-{secrets.token_hex(16)}"
HA_RULES = [
    "resetchannels", "&__sentinel__:hello", "-@all", "+psync", "+replconf", "+ping",
    "+client", "+subscribe", "+publish", "+info", "+multi", "+exec", "+slaveof", "+replicaof",
    "+config|rewrite", "+role",
]  # fmt: skip
SENTINEL_PASSWORD = f"pw-{secrets.token_hex(16)}"
SENTINEL_ADMIN = "sentinel-admin"
SENTINEL_ADMIN_PASSWORD = f"pw-{secrets.token_hex(16)}"
# A master unanswered this long is down to a sentinel: the failover then takes about as long again.
DOWN_AFTER_MS = 1000


def replication_args(master_port: int | None) -> list[str]:
    """A data node's replication: its HA user, with which a replica (and this node, once a
    sentinel turns it into one) authenticates to its master; `replicaof` for a replica."""
    follow = ["--replicaof", "127.0.0.1", str(master_port)] if master_port else []
    return [
        "--user", HA_USER, "on", f">{HA_PASSWORD}", *HA_RULES,
        "--masteruser", HA_USER, "--masterauth", HA_PASSWORD, *follow,
        # A replica (re)joining gets its copy at once, not after the default 5 s gathering others.
        "--repl-diskless-sync-delay", "0",
    ]  # fmt: skip


@dataclass
class ReplicatedRedis:
    """The data nodes by port (either may be master), the sentinels, and the service's URL."""

    log_dir: Path
    nodes: dict[int, Service]
    sentinels: dict[int, Service]
    url: str  # sentinel://llmq:...@127.0.0.1:p1/0;sentinel://127.0.0.1:p2;...
    tls: CertAuthority | None = None

    def env(self) -> dict[str, str]:
        """The service's settings for it (README "Redis high availability")."""
        return {
            "REDIS_URL": self.url,
            "REDIS_SENTINEL_MASTER": SENTINEL_MASTER,
            "REDIS_SENTINEL_USERNAME": SERVICE_USER,
            "REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
            **({"REDIS_SENTINEL_TLS": "true", **self.tls.env()} if self.tls else {}),
        }

    def node_url(self, port: int, admin: bool = True) -> str:
        user, password = (ADMIN_USER, ADMIN_PASSWORD) if admin else (SERVICE_USER, SERVICE_PASSWORD)
        return f"{'rediss' if self.tls else 'redis'}://{user}:{password}@127.0.0.1:{port}/0"

    def node(self, port: int, **options: object) -> redis.Redis:
        """A test's admin client of one data node."""
        return redis_client(self.node_url(port), self.tls, socket_timeout=5, **options)

    def sentinel(self, port: int) -> redis.Redis:
        scheme = "rediss" if self.tls else "redis"
        url = f"{scheme}://{SENTINEL_ADMIN}:{SENTINEL_ADMIN_PASSWORD}@127.0.0.1:{port}"
        return redis_client(url, self.tls, socket_timeout=2, decode_responses=True)

    def master_port(self) -> int:
        """The master as the sentinels' majority names it."""
        votes: dict[int, int] = {}
        for port, svc in self.sentinels.items():
            if svc.proc.poll() is None:
                with contextlib.suppress(redis.RedisError):
                    _, master = self.sentinel(port).sentinel_get_master_addr_by_name(SENTINEL_MASTER)
                    votes[int(master)] = votes.get(int(master), 0) + 1
        return max(votes, key=lambda p: votes[p])

    def start_node(self, port: int, master_port: int | None, extra: Sequence[str] = ()) -> Service:
        name = f"redis-{port}"
        # A replica writes the copy it receives to disk: in the log directory, not the checkout.
        args = [*replication_args(master_port), "--dir", str(self.log_dir), *extra]
        if self.tls is not None:  # replication over TLS too, showing the client certificate
            args += [
                "--tls-replication", "yes",
                "--tls-client-cert-file", str(self.tls.client_cert),
                "--tls-client-key-file", str(self.tls.client_key),
            ]  # fmt: skip
        svc, _ = start_redis(self.log_dir, port, args=args, tls=self.tls, name=name)
        self.nodes[port] = svc
        return svc

    def wait_replicated(self, master: int, timeout: float = 30) -> None:
        """Until `master` has a replica online and the sentinels all see it, each other and it."""

        def ready() -> bool:
            info = self.node(master, decode_responses=True).info("replication")
            online = [v for k, v in info.items() if k.startswith("slave") and v.get("state") == "online"]
            if info.get("role") != "master" or not online:
                return False
            for port in self.sentinels:
                state = self.sentinel(port).sentinel_master(SENTINEL_MASTER)
                if int(state["port"]) != master or int(state["num-slaves"]) < 1:
                    return False
                if int(state["num-other-sentinels"]) < len(self.sentinels) - 1:
                    return False
            return True

        self.nodes[master].wait_until(ready, timeout)

    def stop(self) -> None:
        for svc in [*self.sentinels.values(), *self.nodes.values()]:
            svc.stop()


def sentinel_conf(path: Path, port: int, master_port: int, tls: CertAuthority | None) -> None:
    """A sentinel's configuration file (it rewrites it as it learns the topology)."""
    listen = [f"port {port}"] if tls is None else ["port 0", f"tls-port {port}", "tls-replication yes"]
    tls_lines = []
    if tls is not None:
        tls_lines = [
            f"tls-cert-file {tls.server_cert}", f"tls-key-file {tls.server_key}",
            f"tls-ca-cert-file {tls.ca}", "tls-auth-clients yes",
            # A sentinel talks to the data nodes and its peers as a TLS client, showing this one.
            f"tls-client-cert-file {tls.client_cert}", f"tls-client-key-file {tls.client_key}",
        ]  # fmt: skip
    service_rules = " ".join(keys.sentinel_acl_rules(client_setinfo=redis_version() >= (7, 2)))
    lines = [
        *listen,
        "bind 127.0.0.1",
        f"dir {path.parent}",
        *tls_lines,
        f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 2",
        f"sentinel down-after-milliseconds {SENTINEL_MASTER} {DOWN_AFTER_MS}",
        f"sentinel failover-timeout {SENTINEL_MASTER} 10000",
        f"sentinel auth-user {SENTINEL_MASTER} {HA_USER}",
        f"sentinel auth-pass {SENTINEL_MASTER} {HA_PASSWORD}",
        f"sentinel sentinel-user {SENTINEL_ADMIN}",
        f"sentinel sentinel-pass {SENTINEL_ADMIN_PASSWORD}",
        "user default off",
        f"user {SENTINEL_ADMIN} on >{SENTINEL_ADMIN_PASSWORD} allchannels +@all",
        f"user {SERVICE_USER} on >{SENTINEL_PASSWORD} {service_rules}",
    ]
    path.write_text("\n".join(lines) + "\n")


def start_replicated_redis(
    log_dir: Path, tls: CertAuthority | None = None, master_args: Sequence[str] = ()
) -> ReplicatedRedis:
    """A master, one replica of it, and three sentinels monitoring them; ready when the
    replica is online and every sentinel sees the others. `master_args`: the first master's
    own configuration (min-replicas-to-write: see docs/operations.md for why only its)."""
    ports = [free_port() for _ in range(5)]
    master, replica, sentinel_ports = ports[0], ports[1], ports[2:]
    first = sentinel_ports[0]
    url = f"sentinel://{SERVICE_USER}:{SERVICE_PASSWORD}@127.0.0.1:{first}/0;" + ";".join(
        f"sentinel://127.0.0.1:{p}" for p in sentinel_ports[1:]
    )
    ha = ReplicatedRedis(log_dir, {}, {}, url, tls)
    try:
        ha.start_node(master, None, master_args)
        ha.start_node(replica, master)
        for port in sentinel_ports:
            conf = log_dir / f"sentinel-{port}.conf"
            sentinel_conf(conf, port, master, tls)
            svc = Service(f"sentinel-{port}", ["redis-server", str(conf), "--sentinel"], {}, log_dir)
            ha.sentinels[port] = svc
            svc.wait_until(lambda p=port: bool(ha.sentinel(p).ping()), timeout=20)  # type: ignore[misc]
        ha.wait_replicated(master)
    except BaseException:
        ha.stop()
        raise
    return ha
