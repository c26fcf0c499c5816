"""The architecture's walls, checked on the import statements of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_shared_never_imports_services() -> None:
    offenders = {
        str(p.relative_to(ROOT))
        for p in _modules("shared")
        if any(n.split(".")[0] == "services" for n in _imports(p))
    }
    assert offenders == set()


@pytest.mark.parametrize("service", ["ingest", "results", "worker"])
def test_services_do_not_import_each_other(service: str) -> None:
    others = {f"services.{s}" for s in ("ingest", "results", "worker")} - {f"services.{service}"}
    offenders = {
        str(p.relative_to(ROOT))
        for p in _modules(f"services/{service}")
        if any(n.startswith(tuple(others)) for n in _imports(p))
    }
    assert offenders == set()


# The parts of shared.ml the web services may use: none imports torch at module level (the
# registry imports it inside the functions only the worker and CLI call).
TORCH_FREE_ML = {"shared.ml.config", "shared.ml.evaluation", "shared.ml.registry"}


def _module_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("service", ["ingest", "results"])
def test_web_services_never_load_torch(service: str) -> None:
    # Directly or through shared.ml, which is the worker's, except its torch-free modules.
    offenders = {
        str(p.relative_to(ROOT))
        for p in _modules(f"services/{service}")
        if any(
            n.split(".")[0] == "torch" or (n.startswith("shared.ml") and n not in TORCH_FREE_ML)
            for n in _imports(p)
        )
    }
    assert offenders == set()


@pytest.mark.parametrize("module", sorted(TORCH_FREE_ML))
def test_the_torch_free_ml_modules_import_no_torch_at_module_level(module: str) -> None:
    path = ROOT / (module.replace(".", "/") + ".py")
    heavy = {n for n in _module_level_imports(path) if n.split(".")[0] == "torch"}
    heavy |= {
        n
        for n in _module_level_imports(path)
        if n.startswith("shared.ml") and n not in TORCH_FREE_ML
    }
    assert heavy == set()


def test_web_service_processes_do_not_load_torch_transitively() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, services.ingest.app, services.results.app; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'shared.ml')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]"
