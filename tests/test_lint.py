"""ruff over the whole tree, so style regressions fail the one test command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    ruff = Path(sys.executable).with_name("ruff")
    out = subprocess.run([str(ruff), "check", "--quiet", str(ROOT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _third_party_imports(where: Path) -> set[str]:
    """Top-level names of the third-party modules the .py files under `where` (or the file) import."""
    import ast

    local = {"diloco", "workers", "aggregator", "tests", "bench"}
    found: set[str] = set()
    for path in [where] if where.is_file() else where.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found - local if m not in sys.stdlib_module_names}


def _declared(*groups: str) -> set[str]:
    """Import names provided by the distributions pyproject.toml lists in `groups` (and their deps)."""
    import re
    import tomllib
    from importlib import metadata

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for g in groups:
        reqs += project["optional-dependencies"][g]
    names = {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}
    provided = metadata.packages_distributions()
    return {mod for mod, dists in provided.items() if any(d.lower().replace("_", "-") in names for d in dists)}


def test_every_test_import_is_declared():
    # A clean clone installs only what pyproject.toml names: a package installed here by hand
    # would pass locally and fail CI at collection.
    missing = _third_party_imports(ROOT / "tests") - _declared("test")
    assert not missing, f"tests import {sorted(missing)}, which the [test] extra does not install"


# Modules that only work with an optional extra installed (and say so when it is missing).
OPTIONAL = {"diloco/tasks/hf.py": "hf"}


def test_every_package_import_is_declared():
    code = set()
    for folder in ("diloco", "workers", "aggregator"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.relative_to(ROOT).as_posix() not in OPTIONAL:
                code |= _third_party_imports(path)
    missing = code - _declared()
    assert not missing, f"the package imports {sorted(missing)}, which its dependencies do not install"
    for module, extra in OPTIONAL.items():
        missing = _third_party_imports(ROOT / module) - _declared(extra)
        assert not missing, f"{module} imports {sorted(missing)}, which the [{extra}] extra does not install"
