"""The lock, constraints.txt, against pyproject.toml, this environment and the other pins: every
distribution that pyproject's requirements bring into the environment is pinned there, at the
version installed; pyproject's own ranges admit every pin; the Makefile's torch and Dockerfile.cuda's
bitsandbytes are the locked ones; and every install that resolves dependencies reads the lock. A
dependency added to pyproject without `make lock` fails here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib import metadata

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.processes import ROOT

LOCK = ROOT / "constraints.txt"
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
# The CUDA runtime that a CUDA build of torch brings comes at the versions that torch names; the
# lock is resolved with the CPU build, which has none of it. Only a GPU machine's venv has these.
CUDA_STACK = re.compile(r"nvidia-.*|cuda-.*|triton")


def locked() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        match = PIN.fullmatch(line)
        assert match, f"constraints.txt:{number}: {line!r} is not name==version"
        name = canonicalize_name(match[1])
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = Version(match[2])
    return pins


def project_requirements() -> list[Requirement]:
    """pyproject's dependencies and every extra's: what make install, install-dev and bench ask for."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    return [Requirement(line) for line in [*project["dependencies"], *(r for e in extras for r in e)]]


def applies(requirement: Requirement, extras: Iterable[str]) -> bool:
    """Whether this environment installs it, asked with these extras of its parent."""
    marker = requirement.marker
    return marker is None or any(marker.evaluate({"extra": extra}) for extra in ("", *extras))


def installed_closure() -> dict[str, str]:
    """Every installed distribution that pyproject's requirements reach, and one that asks for it."""
    reached: dict[str, str] = {}
    todo = [(r, "pyproject.toml") for r in project_requirements() if applies(r, ())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        requirement, asker = todo.pop()
        name = canonicalize_name(requirement.name)
        if CUDA_STACK.fullmatch(name) or (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an extra this venv was not given (bench; llamacpp with LLAMA_CPP=0)
        reached.setdefault(name, asker)
        todo += [(r, name) for r in map(Requirement, dist.requires or []) if applies(r, requirement.extras)]
    return reached


def test_the_lock_is_sorted_exact_pins_without_build_labels() -> None:
    pins = locked()
    assert len(pins) > 100  # the whole resolved set, not a hand-picked few
    assert list(pins) == sorted(pins), "make lock writes them sorted; run it rather than editing"
    # A local label (+cpu) would refuse the CUDA build of the same torch, which Dockerfile.cuda installs.
    assert not [f"{n}=={v}" for n, v in pins.items() if v.local], "local labels in constraints.txt"


def test_every_installed_dependency_is_locked_at_the_installed_version() -> None:
    pins = locked()
    reached = installed_closure()
    assert {"torch", "celery", "kombu", "redis", "fastapi"} <= set(reached)  # the walk found the venv
    unpinned = sorted(f"{name} (asked by {asker})" for name, asker in reached.items() if name not in pins)
    assert not unpinned, f"installed but not in constraints.txt; run make lock and commit it: {unpinned}"
    moved = {
        name: f"{metadata.version(name)} installed, {pins[name]} locked"
        for name in reached
        if not SpecifierSet(f"=={pins[name]}").contains(metadata.version(name), prereleases=True)
    }
    assert not moved, f"this venv is not the locked set; make install-dev reinstalls it: {moved}"


def test_pyproject_admits_every_pin() -> None:
    pins = locked()
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        if name not in pins:
            assert not applies(requirement, ()), f"pyproject asks for {requirement}; run make lock"
            continue  # a marker excludes it on the platform the lock was made on
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"pyproject asks for {requirement}, constraints.txt pins {name}=={pins[name]}: "
            "move the pin (make lock) or the range"
        )


def build_args(dockerfile: str) -> dict[str, str]:
    text = (ROOT / dockerfile).read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))


def test_the_pins_outside_the_lock_agree_with_it() -> None:
    pins = locked()
    makefile = (ROOT / "Makefile").read_text()
    torch_spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", makefile, re.M)
    assert torch_spec and Version(torch_spec[1]) == pins["torch"]
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        assert Version(build_args(dockerfile)["TORCH_VERSION"]) == pins["torch"], dockerfile
    assert Version(build_args("Dockerfile.cuda")["BITSANDBYTES_VERSION"]) == pins["bitsandbytes"]


def pip_installs(text: str) -> list[str]:
    """Each `pip install` command, continuation lines joined, up to its `&&` or line end."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [m.split("&&")[0] for m in re.findall(r"pip install .*", joined)]


def test_every_install_that_resolves_dependencies_reads_the_lock() -> None:
    # Into the project's venv, $(PY); the lock target resolves afresh in a venv of its own, on purpose.
    makefile = re.findall(r"^\t\$\(PY\) -m pip install .*", (ROOT / "Makefile").read_text(), re.M)
    resolving = [c for c in makefile if "--no-deps" not in c and "--upgrade pip" not in c]
    assert len(resolving) >= 4  # torch, the project, dev and ops, bench
    assert all("-c $(LOCK)" in c for c in resolving), resolving
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        text = (ROOT / dockerfile).read_text()
        assert re.search(r"^COPY .*\bconstraints\.txt\b", text, re.M), dockerfile
        # torch comes from PyTorch's own index (the lock then moves its dependencies), the project
        # and the embedded model last with --no-deps; everything else is resolved within the lock.
        resolving = [c for c in pip_installs(text) if "--index-url" not in c and "--no-deps" not in c]
        assert resolving and all("-c constraints.txt" in c for c in resolving), (dockerfile, resolving)
