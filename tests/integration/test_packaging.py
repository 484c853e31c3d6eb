"""The installable package, as a user gets it: the wheel built from this tree, installed into a
fresh venv of its own, used from a directory outside the clone.

The wheel is built offline (``pip wheel --no-deps --no-build-isolation --no-index``) from a copy
of the tree, so nothing left in the clone (``build/``, ``*.egg-info``) can leak into it. It is
installed without its dependencies into a new venv; a ``.pth`` file there adds this interpreter's
site-packages (the project's cached venv, which holds the dependencies but not marlgrc itself)
after the venv's own, the way ``--system-site-packages`` would. Every command then runs with the
clone off ``sys.path``: no PYTHONPATH, a working directory outside the clone, and each imported
module is checked to come from the venv.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PARTS = ("schemas", "eventlog", "producers", "stream_processors", "learners", "ledger", "marlgrc", "compose")
"""The project's top-level packages: what the wheel ships, and all it ships."""
DATA = {"schemas": (".avsc",), "compose": (".yml", ".xml", ".properties", ".json"), "marlgrc": (".html", ".js", ".css")}
"""Non-Python files each part ships (pyproject.toml's package-data)."""

# Run by the venv's interpreter (isolated: -I): import every module of every part, found by
# walking the installed packages with pkgutil, and read the schemas back through the package.
# Packages of distributions that marlgrc does not depend on (directly or through a dependency:
# Apache avro, pytest, hypothesis, ...) are present in the project's venv but refused here, so a
# shipped module that needs one fails to import as it would in a user's venv.
IMPORT_ALL = r"""
import importlib, json, pkgutil, sys, traceback
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

site, parts = Path(sys.argv[1]).resolve(), json.loads(sys.argv[2])
found, errors, outside = [], {}, {}

needed, todo = {}, [("marlgrc", frozenset())]
while todo:
    name, extras = todo.pop()
    key = canonicalize_name(name)
    if key in needed and extras <= needed[key]:
        continue
    needed[key] = needed.get(key, frozenset()) | extras
    try:
        requires = metadata.distribution(name).requires or []
    except metadata.PackageNotFoundError:
        errors[f"dependency {name}"] = f"{name} is required but not installed in the project's venv"
        continue
    for line in requires:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (needed[key] or {""})):
            todo.append((req.name, frozenset(req.extras)))
refused = {top: dists for top, dists in metadata.packages_distributions().items()
           if top not in sys.stdlib_module_names and not any(canonicalize_name(d) in needed for d in dists)}
for mod in [m for m in sys.modules if m.partition(".")[0] in refused]:
    del sys.modules[mod]


class Undeclared:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in refused:
            raise ModuleNotFoundError(
                f"{name!r} comes from {', '.join(refused[top])}, which marlgrc does not depend on: "
                f"declare it in pyproject.toml's dependencies or do not import it", name=name)
        return None


sys.meta_path.insert(0, Undeclared())
for part in parts:
    pkg = importlib.import_module(part)
    walked = [part] + [m.name for m in pkgutil.walk_packages(pkg.__path__, part + ".")]
    for name in walked:
        if name.rpartition(".")[2] == "__main__":
            continue  # a command, run as `marlgrc` / `python -m`, not a library module
        found.append(name)
        try:
            module = importlib.import_module(name)
        except BaseException:
            errors[name] = traceback.format_exc(limit=-3)
            continue
        where = Path(getattr(module, "__file__", None) or "").resolve()
        if site not in where.parents:
            outside[name] = str(where)

import compose.services, schemas
print(json.dumps({
    "found": found, "errors": errors, "outside": outside,
    "schema_dir": str(schemas.SCHEMA_DIR),
    "current": sorted(schemas.current()), "history": sorted(schemas.history()),
    "event_schemas": sorted({schemas.schema_name(t) for t in schemas.EVENT_TYPES}),
    "compose_files": sorted(p.name for p in compose.services.COMPOSE_DIR.iterdir() if p.is_file()),
    "refused": sorted(refused),
}))
"""


def _run(argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (
        f"{' '.join(map(str, argv))} exited {res.returncode} (cwd {cwd}):\n"
        f"stdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-4000:]}")
    return res


def _source_modules(src: Path) -> set[str]:
    """Dotted names of the .py modules under the parts in ``src`` (``__main__`` left out)."""
    names = set()
    for part in PARTS:
        for path in (src / part).rglob("*.py"):
            mod = ".".join(path.relative_to(src).with_suffix("").parts)
            if mod.endswith(".__init__"):
                mod = mod[: -len(".__init__")]
            if not mod.endswith("__main__"):
                names.add(mod)
    return names


class Installed:
    """The wheel, the venv it is installed in, and the clean environment to run it with."""

    def __init__(self, root: Path):
        self.src = root / "src"
        self.wheel_dir = root / "wheel"
        self.venv = root / "venv"
        self.outside = root / "elsewhere"  # the working directory: not the clone
        self.outside.mkdir()
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH")}
        self.env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
                        MARLGRC_HOME=str(root / "home"))

        # A copy of what a user's checkout holds; the build happens there, not in the clone.
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
        for part in PARTS:
            shutil.copytree(REPO / part, self.src / part, ignore=ignore)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, self.src / name)

        if importlib.util.find_spec("setuptools") is None:
            pytest.fail(f"setuptools is not installed in {sys.prefix} (torch requires it, so the "
                        f"project's venv has it): reinstall it with pip install setuptools, then retry")
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
              "-w", str(self.wheel_dir), str(self.src)], cwd=self.outside, env=self.env)
        wheels = sorted(self.wheel_dir.glob("marlgrc-*.whl"))
        assert len(wheels) == 1, f"expected one marlgrc wheel in {self.wheel_dir}, found {wheels}"
        self.wheel = wheels[0]

        _run([sys.executable, "-m", "venv", "--without-pip", str(self.venv)], cwd=self.outside, env=self.env)
        self.python = self.venv / "bin" / "python"
        _run([sys.executable, "-m", "pip", "--python", str(self.python), "install", "--no-deps",
              "--no-index", "--no-cache-dir", str(self.wheel)], cwd=self.outside, env=self.env)
        self.site = Path(_run([str(self.python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              cwd=self.outside, env=self.env).stdout.strip())
        # The dependencies: this interpreter's site-packages, after the venv's own (its .pth files
        # processed too, as for any site directory).
        deps = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
        (self.site / "zz_marlgrc_test_deps.pth").write_text(
            "".join(f"import site; site.addsitedir({d!r})\n" for d in deps), encoding="utf-8")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return Installed(tmp_path_factory.mktemp("packaging"))


def test_wheel_ships_the_parts_and_their_data(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = [n for n in wheel.namelist() if ".dist-info/" not in n]
        metadata = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {n.split("/")[0] for n in names} == set(PARTS), "the wheel ships the parts and nothing else"
    shipped_py = {n for n in names if n.endswith(".py")}
    source_py = {str(p.relative_to(installed.src)) for part in PARTS for p in (installed.src / part).rglob("*.py")}
    assert source_py - shipped_py == set(), "every module of the tree is in the wheel (an __init__.py missing?)"
    for part, suffixes in DATA.items():
        source = {str(p.relative_to(installed.src)) for p in (installed.src / part).rglob("*")
                  if p.is_file() and p.suffix in suffixes}
        assert source and source <= set(names), f"{part}'s data files missing from the wheel: {source - set(names)}"
    odd = [n for n in names if not n.endswith((".py", *DATA.get(n.split("/")[0], ())))]
    assert not odd, f"the wheel ships files it has no use for (native sources?): {odd}"
    assert "producers/envs/__init__.py" in names

    requires = {line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")}
    base = {r.split(";")[0].strip() for r in requires if "extra ==" not in r}
    assert not any(r.startswith("avro") for r in base), "Apache avro is for tests only: the test extra"
    assert any(r.startswith("avro") and 'extra == "test"' in r for r in requires)
    assert "marlgrc = marlgrc.cli:main" in entry_points


def test_cli_runs_from_the_installed_package(installed: Installed) -> None:
    res = _run([str(installed.venv / "bin" / "marlgrc"), "--help"], cwd=installed.outside, env=installed.env)
    for command in ("demo", "verify", "run", "train", "export"):
        assert command in res.stdout, f"`marlgrc --help` does not list {command!r}:\n{res.stdout}"
    where = _run([str(installed.python), "-c", "import marlgrc.cli; print(marlgrc.cli.__file__)"],
                 cwd=installed.outside, env=installed.env).stdout.strip()
    assert Path(where).resolve().is_relative_to(installed.site.resolve()), f"marlgrc imported from {where}"
    assert not Path(where).resolve().is_relative_to(REPO), "the clone leaked onto sys.path"


def test_every_module_imports_and_schemas_are_found(installed: Installed) -> None:
    res = _run([str(installed.python), "-I", "-c", IMPORT_ALL, str(installed.site), json.dumps(PARTS)],
               cwd=installed.outside, env=installed.env, timeout=300)
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert not report["errors"], "modules that do not import from the wheel:\n" + "\n".join(
        f"--- {name}\n{tb}" for name, tb in report["errors"].items())
    assert not report["outside"], f"modules imported from outside the venv: {report['outside']}"
    assert {"avro", "pytest", "hypothesis"} <= set(report["refused"]), "test-only packages were importable"
    expected = _source_modules(installed.src)
    assert set(report["found"]) == expected, (
        f"pkgutil found {sorted(set(report['found']) - expected)} not in the tree and missed "
        f"{sorted(expected - set(report['found']))} (a directory without __init__.py?)")

    assert Path(report["schema_dir"]).resolve().is_relative_to(installed.site.resolve())
    tree_schemas = sorted(p.stem for p in (installed.src / "schemas").glob("*.avsc"))
    assert report["current"] == tree_schemas and tree_schemas
    assert set(report["event_schemas"]) <= set(report["current"]), "an event type without its schema"
    assert report["history"] == sorted(p.stem for p in (installed.src / "schemas" / "history").glob("*.avsc"))
    assert {"docker-compose.yml", "kafka-pom.xml"} <= set(report["compose_files"])


def _imported_names(path: Path) -> set[str]:
    """Top-level names of the absolute imports in one module (lazy ones inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_shipped_code_imports_only_what_it_declares() -> None:
    """Each third-party package a shipped module imports is a dependency named in pyproject.toml
    itself, not one that happens to come along with another (nor a test-only one)."""
    declared = {canonicalize_name(Requirement(r).name) for r in tomllib.loads(
        (REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]}
    owners = importlib.metadata.packages_distributions()
    wrong = {}
    for part in PARTS:
        for path in (REPO / part).rglob("*.py"):
            for name in _imported_names(path) - set(PARTS) - set(sys.stdlib_module_names):
                dists = {canonicalize_name(d) for d in owners.get(name, ())}
                if not dists & declared:
                    wrong.setdefault(name, set()).add(f"{path.relative_to(REPO)} ({', '.join(sorted(dists)) or 'not installed'})")
    assert not wrong, "imports of packages pyproject.toml does not declare:\n" + "\n".join(
        f"{name}: {', '.join(sorted(where))}" for name, where in sorted(wrong.items()))


@pytest.mark.integration
def test_demo_runs_from_the_installed_package(installed: Installed, kafka, prefix: str) -> None:
    """`marlgrc demo` from the wheel: a run through producers, a processor worker and the
    encrypted ledger, verified (on the tests' broker, under a topic prefix of its own)."""
    home = installed.outside / "demo-home"
    res = _run([str(installed.venv / "bin" / "marlgrc"), "demo", "--bootstrap", kafka.bootstrap,
                "--prefix", prefix, "--home", str(home), "--episodes", "1"],
               cwd=installed.outside, env=installed.env, timeout=300)
    assert "verdict: VERIFIED" in res.stdout, res.stdout[-4000:]


# docs/ARCHITECTURE.md, "Dependency rules": which of the project's parts each part may import.
MAY_IMPORT = {
    "schemas": set(),
    "eventlog": {"schemas"},
    "producers": {"eventlog", "schemas"},
    "stream_processors": {"eventlog", "schemas"},
    "learners": {"eventlog", "schemas"},
    "ledger": {"eventlog", "schemas"},
    "compose": set(),
    "marlgrc": set(PARTS),
}


def test_parts_import_only_inward() -> None:
    assert set(MAY_IMPORT) == set(PARTS)
    wrong = []
    for part in PARTS:
        for path in sorted((REPO / part).rglob("*.py")):
            for name in sorted((_imported_names(path) & set(PARTS)) - MAY_IMPORT[part] - {part}):
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, ("imports against docs/ARCHITECTURE.md's dependency rules (wire parts together "
                       "in marlgrc/ instead):\n" + "\n".join(wrong))
