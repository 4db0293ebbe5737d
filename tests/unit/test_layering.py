"""The import direction api -> tasks -> model holds (bench imports model, never the reverse), and the
API process never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.processes import ROOT


def imported_after(statement: str) -> set[str]:
    code = f"{statement}\nimport sys\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_api_process_never_imports_torch_or_transformers() -> None:
    modules = imported_after("import api.main; api.main.app.openapi()")
    assert "torch" not in modules
    assert "transformers" not in modules
    assert "model.engine" not in modules


def test_celery_app_alone_does_not_load_the_worker_side() -> None:
    modules = imported_after("import tasks; tasks.app.conf.broker_url")
    assert "torch" not in modules
    assert "tasks.generate" not in modules


def top_packages_imported(package: str) -> dict[str, set[str]]:
    """Per module of `package`, the top-level packages its import statements name (read, not run:
    a lazy import inside a function counts too)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_model_imports_nothing_above_it_nor_the_bench() -> None:
    """model/ is what the worker runs: it imports neither tasks nor api, nor bench/, whose baselines
    (the earlier DynamicCache runner, bench/dynamic_batch.py) import model instead."""
    modules = top_packages_imported("model")
    assert "model/torch_backend.py" in modules
    upward = {path: names & {"api", "tasks", "bench", "tests"} for path, names in modules.items()}
    assert not {path: names for path, names in upward.items() if names}
