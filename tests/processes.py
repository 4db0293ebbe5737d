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
    svc = Service("redis", [*argv, *persistence, *users, *args], {}, log_dir, prefix)
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
