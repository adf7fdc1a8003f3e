"""The public surface: everything exported is listed, nothing private leaks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import fastapi_eventbus
import fastapi_eventbus.cli
import fastapi_eventbus.exceptions
import fastapi_eventbus.otel
import fastapi_eventbus.testing
import fastapi_eventbus.worker
import fastapi_eventbus.worker.pubsub
import fastapi_eventbus.worker.sqs


def _public_names(module: ModuleType, *, defined_in: str) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith(defined_in)
    }


def test_all_lists_every_public_name() -> None:
    exported = _public_names(fastapi_eventbus, defined_in="fastapi_eventbus.")
    assert set(fastapi_eventbus.__all__) >= exported
    assert sorted(fastapi_eventbus.__all__) == fastapi_eventbus.__all__
    for name in fastapi_eventbus.__all__:
        assert hasattr(fastapi_eventbus, name), name


def test_submodule_all_is_complete() -> None:
    for module in (fastapi_eventbus.exceptions, fastapi_eventbus.testing):
        defined = _public_names(module, defined_in=module.__name__)
        assert set(module.__all__) == defined, module.__name__


def test_worker_cli_and_otel_all_are_complete() -> None:
    modules: list[ModuleType] = [
        fastapi_eventbus.otel,
        fastapi_eventbus.worker,
        fastapi_eventbus.worker.sqs,
        fastapi_eventbus.worker.pubsub,
        fastapi_eventbus.cli,
    ]
    for module in modules:
        defined = _public_names(module, defined_in=module.__name__)
        assert set(module.__all__) >= defined, module.__name__
        assert sorted(module.__all__) == module.__all__, module.__name__
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_every_exception_derives_from_the_base() -> None:
    for name in fastapi_eventbus.exceptions.__all__:
        assert issubclass(getattr(fastapi_eventbus.exceptions, name), Exception)
        assert issubclass(
            getattr(fastapi_eventbus.exceptions, name), fastapi_eventbus.EventBusError
        )


def test_import_does_not_pull_optional_sdks() -> None:
    # FastAPI itself may import opentelemetry when it is installed: compare against it.
    code = (
        "import sys, fastapi; before = set(sys.modules);"
        "import fastapi_eventbus, fastapi_eventbus.testing;"
        "sdks = ('aiobotocore', 'botocore', 'gcloud', 'opentelemetry');"
        "bad = [m for m in set(sys.modules) - before if m.split('.')[0] in sdks];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_does_not_pull_the_cli_library_or_the_worker_sdks() -> None:
    code = (
        "import sys, fastapi; before = set(sys.modules);"
        "import fastapi_eventbus; assert 'click' not in sys.modules, 'click';"
        "import fastapi_eventbus.worker;"
        "sdks = ('aiobotocore', 'botocore', 'gcloud', 'aiohttp', 'click');"
        "bad = [m for m in set(sys.modules) - before if m.split('.')[0] in sdks];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_version_is_a_string() -> None:
    assert isinstance(fastapi_eventbus.__version__, str)
    assert fastapi_eventbus.__version__


def test_fastapi_internals_are_touched_in_one_module() -> None:
    package = Path(fastapi_eventbus.__file__).parent
    touching = sorted(
        path.name
        for path in package.rglob("*.py")
        if "fastapi.dependencies" in path.read_text() or "fastapi_inner_astack" in path.read_text()
    )
    assert touching == ["_di.py"]
