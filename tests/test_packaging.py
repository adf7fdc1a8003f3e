"""What pip installs and what the sdist carries: built once per session, then read back.

The wheel and sdist are built with ``python -m build`` into a temporary directory, or, when
``FASTAPI_EVENTBUS_DIST`` names a directory, taken from there: CI's run against the
installed wheel checks the very artifacts it built and installed (its source tree has no
package to build from).

The distribution is ``fastapi-eventbus-di``: the short name on PyPI is an unrelated project.
The package stays ``fastapi_eventbus`` and the command ``fastapi-eventbus``; the last tests
check that every install command and message names the distribution, not the taken name.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from email.message import Message
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from click.testing import CliRunner
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import fastapi_eventbus
from fastapi_eventbus.cli import main
from fastapi_eventbus.exceptions import MissingExtraError

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT: dict[str, Any] = PYPROJECT["project"]
DISTRIBUTION: str = PROJECT["name"]
"""What users install; the import name and the command are ``fastapi_eventbus``."""
TAKEN = "fastapi-eventbus"
"""The name an unrelated project holds on PyPI: nothing may tell users to install it."""
ARTIFACT = canonicalize_name(DISTRIBUTION).replace("-", "_")
"""The distribution's name in the artifacts' file names: ``fastapi_eventbus_di``."""
SDKS = {
    "aws": {"aiobotocore"},
    "gcp": {"gcloud-aio-pubsub", "pyjwt"},  # pyjwt: serverless.GoogleOIDC
    "otel": {"opentelemetry-api"},
    "sqlalchemy": {"sqlalchemy"},
}
"""The extra of each cloud (and of tracing), and the SDK it installs."""


@dataclass(frozen=True)
class Dist:
    wheel: list[str]
    """The wheel's file names."""
    sdist: list[str]
    """The sdist's file names, relative to its top directory."""
    metadata: Message
    entry_points: str


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    given = os.environ.get("FASTAPI_EVENTBUS_DIST")
    if given:
        outdir = Path(given)
    else:
        if not (ROOT / "fastapi_eventbus").is_dir():
            pytest.fail(f"no package to build in {ROOT}: set FASTAPI_EVENTBUS_DIST")
        outdir = tmp_path_factory.mktemp("dist")
        command = [sys.executable, "-m", "build", "--outdir", str(outdir), str(ROOT)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = outdir.glob(f"{ARTIFACT}-*-py3-none-any.whl")
    (sdist,) = outdir.glob(f"{ARTIFACT}-*.tar.gz")
    dist_info = f"{ARTIFACT}-{PROJECT['version']}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        metadata = email.parser.BytesParser().parsebytes(archive.read(f"{dist_info}/METADATA"))
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
        wheel_files = archive.namelist()
    with tarfile.open(sdist) as archive:
        top = f"{ARTIFACT}-{PROJECT['version']}/"
        sdist_files = [m.name.removeprefix(top) for m in archive.getmembers() if m.isfile()]
        assert all(m.name.startswith(top) or m.name == top[:-1] for m in archive.getmembers())
    return Dist(wheel_files, sdist_files, metadata, entry_points)


def _python_files(names: list[str], under: str) -> set[str]:
    return {name for name in names if name.startswith(f"{under}/") and name.endswith(".py")}


def _tree(directory: str, *suffixes: str) -> set[str]:
    """The files of *directory* in this tree, relative to its root, without caches."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / directory).rglob("*")
        if path.is_file() and path.suffix in suffixes and "__pycache__" not in path.parts
    }


def _requirements(metadata: Message, extra: str | None) -> set[str]:
    """``Requires-Dist`` of *extra* (None: the base dependencies), without the marker."""
    found = set()
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        in_extra = marker is not None and marker.evaluate({"extra": extra or ""})
        if (marker is None and extra is None) or (extra is not None and in_extra):
            requirement.marker = None
            found.add(str(requirement))
    return found


def test_the_version_is_pyprojects() -> None:
    # Not the "0.0.0" of a source tree without metadata: the installed distribution's.
    assert fastapi_eventbus.__version__ == PROJECT["version"]
    assert importlib.metadata.version(DISTRIBUTION) == PROJECT["version"]
    assert fastapi_eventbus.__version__ != "0.0.0"


def test_the_wheel_holds_the_package_and_nothing_else(dist: Dist) -> None:
    dist_info = f"{ARTIFACT}-{PROJECT['version']}.dist-info/"
    outside = [n for n in dist.wheel if not n.startswith(("fastapi_eventbus/", dist_info))]
    assert outside == []  # no tests/, benchmarks/, docs/, examples/
    assert "fastapi_eventbus/py.typed" in dist.wheel
    # Every module: those of the imported package (this tree's, or the installed wheel's),
    # and those of the sdist.
    package = Path(fastapi_eventbus.__file__).parent
    imported = {f"fastapi_eventbus/{p.relative_to(package)}" for p in package.rglob("*.py")}
    in_wheel = _python_files(dist.wheel, "fastapi_eventbus")
    assert in_wheel == imported
    assert in_wheel == _python_files(dist.sdist, "fastapi_eventbus")


def test_the_wheel_metadata(dist: Dist) -> None:
    metadata = dist.metadata
    assert metadata["Name"] == DISTRIBUTION == "fastapi-eventbus-di"
    assert metadata["Version"] == PROJECT["version"] == fastapi_eventbus.__version__
    assert metadata["Requires-Python"] == PROJECT["requires-python"] == ">=3.11"
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert "Typing :: Typed" in metadata.get_all("Classifier", [])
    assert _requirements(metadata, None) == {str(Requirement(r)) for r in PROJECT["dependencies"]}


@pytest.mark.parametrize("extra", sorted(SDKS))
def test_each_extra_installs_its_sdk(dist: Dist, extra: str) -> None:
    assert extra in dist.metadata.get_all("Provides-Extra", [])
    required = _requirements(dist.metadata, extra)
    assert required == {str(Requirement(r)) for r in PROJECT["optional-dependencies"][extra]}
    assert {Requirement(r).name for r in required} == SDKS[extra]


def test_no_extra_requires_the_package_itself(dist: Dist) -> None:
    # pyproject's dev, bench and all extras name the distribution itself with the SDK extras;
    # the build flattens them, so installing "<wheel>[dev]" never asks an index for it (and
    # never for the taken name, which is someone else's package).
    names = {
        canonicalize_name(Requirement(line).name)
        for line in dist.metadata.get_all("Requires-Dist", [])
    }
    assert DISTRIBUTION not in names
    assert TAKEN not in names
    assert _requirements(dist.metadata, "dev") >= _requirements(dist.metadata, "all")


def test_the_console_script(dist: Dist) -> None:
    assert "[console_scripts]\nfastapi-eventbus = fastapi_eventbus.cli:main" in dist.entry_points
    assert PROJECT["scripts"] == {"fastapi-eventbus": "fastapi_eventbus.cli:main"}


def test_the_sdist_carries_what_the_tests_read(dist: Dist) -> None:
    files = set(dist.sdist)
    assert {"PKG-INFO", "pyproject.toml", "README.md", "CHANGELOG.md", "mkdocs.yml"} <= files
    assert {".ci/run", "fastapi_eventbus/py.typed", "tests/conftest.py"} <= files
    assert _python_files(dist.sdist, "tests") == _tree("tests", ".py")
    assert _python_files(dist.sdist, "examples") == _tree("examples", ".py")
    assert _tree("docs", ".md", ".py") <= {n for n in files if PurePosixPath(n).parts[0] == "docs"}
    assert _tree("docs", ".py") >= {"docs/examples/minimal.py"}


# -- the name users are told to install ---------------------------------------------------

PIP_INSTALL = re.compile(r"\bpip3? install\b((?:[^\n`&;|#,.]|[,.](?=\S))*)")
"""A ``pip install`` command's arguments: up to the end of its line, code span, shell command
or comment, or a comma or full stop that ends a clause (not those of ``".[dev]"`` or
``[aws,gcp]``)."""
NAMED = re.compile(r"(?<![\w.-])(fastapi[-_.]eventbus[\w-]*)", re.IGNORECASE)
"""This project's name, or any name that starts like it, in a ``pip install`` command."""
TAKEN_WITH_EXTRAS = re.compile(r"(?<![\w.-])fastapi[-_.]eventbus\[", re.IGNORECASE)
"""The taken name as a requirement with extras, anywhere (``Install `...[aws]` ``, pyproject)."""


def _installed_names(text: str) -> list[str]:
    """The names *text*'s ``pip install`` commands give that look like this project's."""
    return [name for command in PIP_INSTALL.findall(text) for name in NAMED.findall(command)]


def _user_facing_files() -> list[Path]:
    """What tells users what to install: the README and the changelog, pyproject, the CI
    script, the docs, the examples, the benchmarks, the tests (which assert the messages)
    and the imported package's own modules (its messages and docstrings)."""
    top = ["README.md", "CHANGELOG.md", "pyproject.toml", ".ci/run", "mkdocs.yml"]
    trees = [
        *_tree("docs", ".md", ".py"),
        *_tree("examples", ".md", ".py"),
        *_tree("benchmarks", ".md", ".py"),
        *_tree("tests", ".py"),
    ]
    package = Path(fastapi_eventbus.__file__).parent
    return [*(ROOT / name for name in [*top, *trees]), *sorted(package.rglob("*.py"))]


def test_the_readme_and_the_docs_install_the_distribution() -> None:
    # The README's install command and the docs' installation section: the requirement each
    # gives (other than the repository itself, ".[dev]") is the distribution pyproject names.
    for page in ("README.md", "docs/index.md"):
        commands = [shlex.split(args) for args in PIP_INSTALL.findall((ROOT / page).read_text())]
        requirements = [
            Requirement(arg) for args in commands for arg in args if not arg.startswith(("-", "."))
        ]
        assert [canonicalize_name(r.name) for r in requirements] == [DISTRIBUTION], page


def test_nothing_tells_users_to_install_the_taken_name() -> None:
    files = _user_facing_files()
    assert ROOT / "docs/index.md" in files
    wrong: dict[str, list[str]] = {}
    for path in files:
        text = path.read_text()
        names = [n for n in _installed_names(text) if canonicalize_name(n) != DISTRIBUTION]
        names += TAKEN_WITH_EXTRAS.findall(text)
        if names:
            wrong[str(path)] = names
    assert wrong == {}
    # What the checks catch (spelled so that this file does not trip them).
    taken = TAKEN.replace("-", "_")
    assert _installed_names(f"`pip install {taken}`, then") == [taken]
    assert _installed_names(f'pip install "{TAKEN}[aws]"  # SQS') == [TAKEN]
    assert _installed_names(f"pip install {DISTRIBUTION}[gcp] {TAKEN}.") == [DISTRIBUTION, TAKEN]
    assert _installed_names(f"pip install '{DISTRIBUTION}[aws,gcp]' x. The {TAKEN} command") == [
        DISTRIBUTION
    ]
    assert _installed_names(f"(pip install, the {TAKEN} command)") == []
    assert TAKEN_WITH_EXTRAS.search(f"Install `{TAKEN}[aws]`.")
    assert not TAKEN_WITH_EXTRAS.search(f"Install `{DISTRIBUTION}[aws]`.")


@pytest.mark.parametrize("extra", sorted(SDKS))
def test_a_missing_extra_names_the_distribution(extra: str) -> None:
    message = str(MissingExtraError(extra, "the SDK"))
    ((args,),) = [shlex.split(command) for command in PIP_INSTALL.findall(message)]
    requirement = Requirement(args)
    assert (requirement.name, requirement.extras) == (DISTRIBUTION, {extra})
    assert extra in PROJECT["optional-dependencies"]


def test_the_command_s_version_is_the_distribution_s() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"fastapi-eventbus, version {PROJECT['version']}\n"
