"""The architecture's walls, checked on every module's source: what may import what, and
where an image's status may be written."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("ingest", "results", "worker")
# The applications that use the services; shared/ is the services' library and knows none.
APPLICATIONS = ("cli", "devstack", "mammoscreen_client", "bench", "tests")


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def imported_names(source: str, *, module_level_only: bool = False) -> set[str]:
    """Every module name an import statement in `source` names (absolute imports)."""
    tree = ast.parse(source)
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def names_a_service(source: str) -> bool:
    """Whether `source` imports a service, or names one in a string (a module path that a
    process launcher or importlib would load)."""
    if any(name.split(".")[0] == "services" for name in imported_names(source)):
        return True
    return any(
        isinstance(node, ast.Constant) and isinstance(node.value, str) and "services." in node.value
        for node in ast.walk(ast.parse(source))
    )


def _updates_images(call: ast.Call) -> bool:
    """Whether a call is `.values(...)` on a chain that starts with `update(Image)`."""
    node: ast.AST = call.func
    while isinstance(node, ast.Attribute | ast.Call):
        node = node.value if isinstance(node, ast.Attribute) else node.func
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "update"
            and any(isinstance(a, ast.Name) and a.id == "Image" for a in node.args)
        ):
            return True
    return False


def writes_image_status(source: str) -> bool:
    """Whether `source` writes an image's status: `x.status = ImageStatus...`, `status=` in
    `Image(...)` or in `update(Image)...values(...)`, or any `status=ImageStatus...`."""

    def mentions_image_status(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Name) and n.id == "ImageStatus" for n in ast.walk(node))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if (
                any(isinstance(t, ast.Attribute) and t.attr == "status" for t in targets)
                and node.value is not None
                and mentions_image_status(node.value)
            ):
                return True
        if isinstance(node, ast.Call) and any(k.arg == "status" for k in node.keywords):
            status = next(k.value for k in node.keywords if k.arg == "status")
            builds_image = isinstance(node.func, ast.Name) and node.func.id == "Image"
            if builds_image or _updates_images(node) or mentions_image_status(status):
                return True
    return False


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_shared_never_imports_or_names_a_service() -> None:
    offenders = {_relative(p) for p in _modules("shared") if names_a_service(p.read_text())}
    assert offenders == set()


def test_shared_never_imports_the_applications() -> None:
    offenders = {
        _relative(p)
        for p in _modules("shared")
        if any(n.split(".")[0] in APPLICATIONS for n in imported_names(p.read_text()))
    }
    assert offenders == set()


def test_shared_holds_no_command_line_client_devstack_or_synthetic_data_code() -> None:
    # The applications have top-level packages of their own (cli/, client/, devstack/).
    names = {p.stem for p in _modules("shared")} | {p.name for p in (ROOT / "shared").iterdir()}
    assert not names & {"cli", "cli_client", "client", "devstack", "synth", "stack", "servers"}
    uses = {
        _relative(p)
        for p in _modules("shared")
        if {"argparse", "tqdm", "imagecodecs"} & imported_names(p.read_text())
    }
    assert uses == set()


def test_the_client_imports_nothing_of_the_server() -> None:
    allowed = {"httpx"}
    for path in _modules("client"):
        third_party = {
            n.split(".")[0]
            for n in imported_names(path.read_text())
            if n.split(".")[0] not in sys.stdlib_module_names
        }
        assert third_party <= allowed | {"mammoscreen_client"}, _relative(path)


@pytest.mark.parametrize("service", SERVICES)
def test_services_do_not_import_each_other_or_the_applications(service: str) -> None:
    others = {f"services.{s}" for s in SERVICES} - {f"services.{service}"}
    offenders = {
        _relative(p)
        for p in _modules(f"services/{service}")
        for n in imported_names(p.read_text())
        if n.startswith(tuple(others)) or n.split(".")[0] in APPLICATIONS
    }
    assert offenders == set()


# The parts of shared.ml the web services may use: none imports torch at module level (the
# registry imports it inside the functions only the worker and CLI call).
TORCH_FREE_ML = {"shared.ml.config", "shared.ml.evaluation", "shared.ml.registry"}


@pytest.mark.parametrize("service", ["ingest", "results"])
def test_web_services_never_import_torch_or_the_torch_parts_of_ml(service: str) -> None:
    offenders = {
        _relative(p)
        for p in _modules(f"services/{service}")
        for n in imported_names(p.read_text())
        if n.split(".")[0] == "torch" or (n.startswith("shared.ml") and n not in TORCH_FREE_ML)
    }
    assert offenders == set()


@pytest.mark.parametrize("module", sorted(TORCH_FREE_ML))
def test_the_torch_free_ml_modules_import_no_torch_at_module_level(module: str) -> None:
    path = ROOT / (module.replace(".", "/") + ".py")
    names = imported_names(path.read_text(), module_level_only=True)
    heavy = {n for n in names if n.split(".")[0] == "torch"}
    heavy |= {n for n in names if n.startswith("shared.ml") and n not in TORCH_FREE_ML}
    assert heavy == set()


def _loaded_by(module: str) -> set[str]:
    """Top-level packages that importing `module` loads, in a fresh interpreter."""
    probe = (
        f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return set(loaded)


def test_the_results_service_loads_neither_torch_nor_pydicom_nor_numpy() -> None:
    # It only reads rows and streams stored bytes: the worker renders heatmaps and previews.
    assert _loaded_by("services.results.app") & {"torch", "pydicom", "numpy", "PIL"} == set()


def test_the_ingest_service_loads_no_torch() -> None:
    assert "torch" not in _loaded_by("services.ingest.app")


LIFECYCLE = ROOT / "shared" / "lifecycle.py"


def test_only_the_lifecycle_module_writes_an_image_status() -> None:
    offenders = {
        _relative(p)
        for folder in ("shared", "services", "cli", "devstack", "bench")
        for p in _modules(folder)
        if p != LIFECYCLE and writes_image_status(p.read_text())
    }
    assert offenders == set()
    assert writes_image_status(LIFECYCLE.read_text())  # the detector sees the real writes


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("image.status = ImageStatus.DONE", True),
        ("rows[0].status = ImageStatus.FAILED if bad else ImageStatus.DONE", True),
        ("update(Image).values(status=ImageStatus.QUEUED)", True),
        ("Image(id=i, status=ImageStatus.STORED)", True),
        ("Image(id=i, status=initial)", True),
        ("session.execute(update(Image).where(w).values(status=target, x=1))", True),
        ("update(Batch).values(status=BatchStatus.OPEN)", False),
        ("batch.status = BatchStatus.COMPLETED", False),
        ("select(Image).where(Image.status == ImageStatus.QUEUED)", False),
        ("response.status = 200", False),
    ],
)
def test_the_status_write_detector(source: str, found: bool) -> None:
    assert writes_image_status(source) is found


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("from services.worker import celery_app", True),
        ("import services.ingest.app", True),
        ('COMMAND = ["celery", "-A", "services.worker.celery_app", "worker"]', True),
        ("from shared.storage import Keys", False),
        ('HELP = "the results service"', False),
    ],
)
def test_the_service_reference_detector(source: str, found: bool) -> None:
    assert names_a_service(source) is found
