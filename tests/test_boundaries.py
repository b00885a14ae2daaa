"""Package boundaries that keep each role small (ARCHITECTURE.md), checked on the source itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"shelfloop", "edge_agent", "models", "planograms", "cloud_api", "retrain"}

# package -> first-party packages it must never import
FORBIDDEN = {
    "edge_agent": {"cloud_api", "retrain"},
    "models": FIRST_PARTY - {"models"},
    "planograms": FIRST_PARTY - {"planograms"},
    "cloud_api": {"edge_agent", "retrain"},
}
HEAVY_ML = {"torch", "torchvision", "ultralytics"}
EDGE_SIDE = ["edge_agent", "models", "planograms"]


def _imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for n in names:
                found.setdefault(n.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_what_it_must_not(package):
    imported = _imports(package)
    bad = {m: sorted(f) for m, f in imported.items() if m in FORBIDDEN[package]}
    assert bad == {}


@pytest.mark.parametrize("package", [*EDGE_SIDE, "shelfloop"])
def test_edge_side_never_imports_torch_or_ultralytics(package):
    imported = _imports(package)
    assert {m: sorted(f) for m, f in imported.items() if m in HEAVY_ML} == {}


def test_contract_pulls_in_nothing_heavy():
    code = (
        "import sys, shelfloop.contract; heavy = {'numpy', 'pydantic', 'paho', 'cv2', 'PIL', 'torch'} "
        "& {m.split('.')[0] for m in sys.modules}; print(sorted(heavy)); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
