"""The import direction api -> tasks -> model holds, and the API process never loads torch."""

from __future__ import annotations

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
