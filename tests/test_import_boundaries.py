"""Import boundaries between the three packages, and every third-party import declared (pinned) in its extra.

- ``gair_model`` (the training image: core + ``train``) never loads Dagster, DuckDB or GDAL (rasterio, and the
  geopandas/pyogrio stack) nor the STAC clients, nor :mod:`pipelines`;
- ``gair_dataset`` (core + ``dataset``) never loads torch or Dagster, nor :mod:`gair_model` or :mod:`pipelines`.

Each package is imported module by module (every ``.py`` file, parents first) in a fresh interpreter, so the first
module that drags a forbidden package in is named. The static test reads every module's AST (lazy imports inside
functions included) and checks each third-party import against ``[project.dependencies]`` and the extras in
pyproject.toml.
"""

import ast
import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGES = ("gair_dataset", "gair_model", "pipelines")

FORBIDDEN = {
    "gair_model": ("dagster", "duckdb", "rasterio", "geopandas", "pyogrio", "pystac_client", "planetary_computer",
                   "rustac", "pipelines"),
    "gair_dataset": ("torch", "torchvision", "timm", "dagster", "gair_model", "pipelines"),
}
#: The extras a package may import from (besides the core dependencies).
ALLOWED_EXTRAS = {
    "gair_dataset": ("dataset",),
    "gair_model": ("train",),
    "pipelines": ("dataset", "train", "pipelines"),
}

# Imports every module of a package in turn; reports which module first loaded each forbidden top-level package.
WALK = r'''
import importlib, json, sys
from pathlib import Path

package, forbidden = sys.argv[1], sys.argv[2].split(",")
root = importlib.import_module(package)
base = Path(root.__file__).parent
modules = sorted(".".join((package, *p.relative_to(base).with_suffix("").parts)).removesuffix(".__init__")
                 for p in base.rglob("*.py") if "__pycache__" not in p.parts)
culprits = {f: package for f in forbidden if f in sys.modules}
for name in modules:
    importlib.import_module(name)
    for f in forbidden:
        if f in sys.modules and f not in culprits:
            culprits[f] = name
print(json.dumps({"modules": modules, "culprits": culprits, "file": root.__file__}))
'''


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())[0]).lower()


def _requirements(group: str | None) -> list[str]:
    project = PYPROJECT["project"]
    return project["dependencies"] if group is None else project["optional-dependencies"][group]


def _third_party_imports(package: str) -> dict[str, set[str]]:
    """Top-level third-party names imported anywhere in the package -> the files importing them."""
    own = set(PACKAGES)
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in own and top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


@pytest.fixture(scope="module")
def walks() -> dict[str, dict]:
    """Both packages walked in parallel, each in a fresh interpreter started in the checkout."""
    procs = {pkg: subprocess.Popen([sys.executable, "-c", WALK, pkg, ",".join(bad)], cwd=REPO, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for pkg, bad in FORBIDDEN.items()}
    out = {}
    for pkg, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"importing every module of {pkg} failed:\n{stderr[-5000:]}"
        out[pkg] = json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_loads_a_forbidden_package(walks, package):
    got = walks[package]
    assert Path(got["file"]).resolve().is_relative_to(REPO), got["file"]  # the checkout, not an installed copy
    assert len(got["modules"]) > 5
    culprits = got["culprits"]
    assert not culprits, "; ".join(f"importing {mod} loads {bad}" for bad, mod in sorted(culprits.items()))


@pytest.mark.parametrize("group", [None, *PYPROJECT["project"]["optional-dependencies"]])
def test_every_requirement_is_pinned(group):
    loose = [r for r in _requirements(group) if _name(r) != "gair-pipeline" and not re.search(r"==[^,;*]+$",
                                                                                                 r.split(";")[0])]
    assert not loose, f"not pinned with == in {group or 'dependencies'}: {loose}"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_third_party_import_is_declared_in_its_extras(package):
    declared = {_name(r) for r in _requirements(None)}
    for extra in ALLOWED_EXTRAS[package]:
        declared |= {_name(r) for r in _requirements(extra)}
    dists = packages_distributions()
    undeclared = {}
    for top, files in _third_party_imports(package).items():
        names = {_name(d) for d in dists.get(top, [])}
        if not names & declared:
            undeclared[top] = (sorted(names) or ["(not installed)"], sorted(files)[:3])
    allowed = " + ".join(("core", *ALLOWED_EXTRAS[package]))
    assert not undeclared, f"{package} imports packages not declared in {allowed} of pyproject.toml: {undeclared}"
