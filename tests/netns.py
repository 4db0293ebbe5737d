"""Several hosts on one Linux machine, for tests: network namespaces on one LAN, and a launcher
that runs a process as one host's own PID 1.

    Network(["redis", "api-a", ...])    one namespace per host, each with its own address on
                                        10.x.y.0/24, plugged into a bridge (the switch) by a veth
                                        pair; the test's namespace is plugged in too, as 10.x.y.1
    network.prefix("api-a")             the argv prefix that runs a tests/processes.py Service
                                        on that host: `ip netns exec NS python -m tests.netns --`
    network.link("worker-a", up=False)  pull a host's cable out of the switch (and back)

The switch sits in a namespace of its own rather than in the test's: there it sees no firewall
(a machine running Docker drops bridged traffic in its FORWARD chain once br_netfilter is
loaded), and every name in it is private. Only the test's own veth end is named in the test's
namespace, so every run's names carry a random suffix and two runs never collide.

The launcher gives each host process a PID namespace too (it runs as PID 1 there, as in a
container), while every host keeps this machine's host name: the harshest case for anything that
would tell hosts apart by host name and process id.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import TracebackType

PREFIX = "llmq-"
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
# What the launcher passes on to its host process: how a test stops a service (SIGTERM, as
# `docker stop` does) and Ctrl-C. SIGKILL needs no forwarding: Service.stop sends it to the
# whole process group, launcher and host process alike.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)


class NamespaceError(RuntimeError):
    """An `ip` command failed: the message has the command and what it said."""


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no address or route of this namespace overlaps (another run's
    network included)."""
    taken: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for word in (ip("-4", "-o", "addr", "show") + ip("-4", "route", "show")).split():
        with contextlib.suppress(ValueError):  # words that are no address: devices, keywords
            taken.append(ipaddress.ip_network(word, strict=False))
    for _ in range(100):
        subnet = ipaddress.IPv4Network(f"10.{random.randint(64, 254)}.{random.randint(0, 255)}.0/24")
        if not any(subnet.overlaps(t) for t in taken):
            return subnet
    raise NamespaceError("no free 10.x.y.0/24 subnet")


class Network:
    """The hosts named by `roles` on one LAN; a context manager that removes every namespace,
    veth and bridge it made on exit, however the block ended (a failed set-up included)."""

    def __init__(self, roles: Sequence[str]) -> None:
        if {"switch", "uplink", "eth0", "lan"} & set(roles) or any(len(r) > 15 for r in roles):
            raise ValueError(f"host roles must be interface names, not switch/uplink/eth0/lan: {roles}")
        self.suffix = secrets.token_hex(3)
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        self.gateway = str(hosts[0])  # the test's own end
        self.addresses = {role: str(hosts[i + 1]) for i, role in enumerate(roles)}
        self.lan = self.netns("lan")
        self.uplink = f"{PREFIX}{self.suffix}"  # the one name in the test's namespace

    def netns(self, role: str) -> str:
        return f"{PREFIX}{self.suffix}-{role}"

    @property
    def namespaces(self) -> list[str]:
        return [self.netns(role) for role in self.addresses] + [self.lan]

    def __enter__(self) -> Network:
        try:
            self._create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()

    def _create(self) -> None:
        prefix_len = str(self.subnet.prefixlen)
        ip("netns", "add", self.lan)
        ip("-n", self.lan, "link", "add", "name", "switch", "type", "bridge")
        ip("-n", self.lan, "link", "set", "dev", "switch", "up")
        ip("link", "add", "name", self.uplink, "type", "veth", "peer", "name", "uplink", "netns", self.lan)
        ip("-n", self.lan, "link", "set", "dev", "uplink", "master", "switch", "up")
        ip("addr", "add", f"{self.gateway}/{prefix_len}", "dev", self.uplink)
        ip("link", "set", "dev", self.uplink, "up")
        for role, address in self.addresses.items():
            host = self.netns(role)
            ip("netns", "add", host)
            # The switch's port is named after the host; the host's end is its eth0.
            ip(
                "-n",
                self.lan,
                "link",
                "add",
                "name",
                role,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host,
            )
            ip("-n", self.lan, "link", "set", "dev", role, "master", "switch", "up")
            ip("-n", host, "addr", "add", f"{address}/{prefix_len}", "dev", "eth0")
            ip("-n", host, "link", "set", "dev", "eth0", "up")
            ip("-n", host, "link", "set", "dev", "lo", "up")

    def destroy(self) -> None:
        """Remove what this network made, each piece on its own (one that is already gone, or
        fails, stops no other). Deleting a namespace frees its interfaces only once the kernel
        gets to it; the test's veth end is deleted first, by name, so it is gone on return."""
        with contextlib.suppress(NamespaceError):
            ip("link", "del", "dev", self.uplink)
        for ns in self.namespaces:
            with contextlib.suppress(NamespaceError):
                ip("netns", "del", ns)

    def leftovers(self) -> list[str]:
        """What of this network still exists: namespaces, and the test's veth end."""
        names = {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}
        left = sorted(set(self.namespaces) & names)
        with contextlib.suppress(NamespaceError):
            ip("link", "show", "dev", self.uplink)
            left.append(self.uplink)
        return left

    def prefix(self, role: str) -> list[str]:
        """Run a command on `role`'s host: in its network namespace, as PID 1 of its own."""
        return ["ip", "netns", "exec", self.netns(role), sys.executable, "-m", "tests.netns", "--"]

    def link(self, role: str, up: bool) -> None:
        """Plug `role`'s cable into the switch or pull it out: the host keeps its address and
        its connections, and packets to and from it are dropped until it is back."""
        ip("-n", self.lan, "link", "set", "dev", role, "up" if up else "down")


def unavailable() -> str | None:
    """Why this machine cannot make the namespaces a Network needs, or None if it can: a quick
    network of one host, with a command run on it through the launcher."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux's; this is {sys.platform}"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    try:
        with Network(["probe"]) as network:
            run = subprocess.run(
                [*network.prefix("probe"), "true"], capture_output=True, text=True, timeout=30
            )
            if run.returncode != 0:
                return f"cannot run a process in a namespace: {run.stderr.strip()}"
    except NamespaceError as exc:
        return f"cannot make network namespaces (root or CAP_NET_ADMIN needed): {exc}"
    return None


def _launch(argv: list[str]) -> int:
    """Run `argv` as PID 1 of a new PID namespace and wait for it, passing on FORWARDED signals;
    its exit status is ours. It dies with us (a SIGKILL to the launcher alone reaches it too)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWPID) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"unshare(CLONE_NEWPID): {os.strerror(error)}")
    child = os.fork()  # the first child in the new namespace is its PID 1
    if child == 0:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.execvp(argv[0], argv)

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, sig)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # killed by a signal: so are we, as a shell would report it
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    if sys.argv[1:2] != ["--"] or len(sys.argv) < 3:
        sys.exit("usage: python -m tests.netns -- COMMAND [ARG...]")
    sys.exit(_launch(sys.argv[2:]))
