"""Loading the ``APP`` argument of the ``handlers`` and ``worker`` commands.

``APP`` is an import string like uvicorn's, ``module:attribute``, naming a FastAPI app
with an installed bus (or an `EventBus`). Whatever keeps it from loading is a usage
error (exit code 2), so that a typo in a deployment's command line says what it is.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import click

from fastapi_eventbus._bus import EventBus
from fastapi_eventbus.exceptions import BusNotInstalledError


def load(target: str, *, factory: bool = False, app_dir: str = ".") -> Any:
    """Import ``module:attribute`` (the attribute may be dotted), like uvicorn does.

    With *factory*, the attribute is called without arguments and its result
    is used. *app_dir* is put first on ``sys.path``. Whatever keeps APP from
    loading is a usage error (exit code 2); when the module's own code or the
    factory raised, its traceback is printed first.
    """
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(
            f"{target!r} is not of the form 'module:attribute'", param_hint="APP"
        )
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    try:
        value: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            _not_loaded(f"importing module {module_name!r} failed", exc)  # a missing import
        raise click.BadParameter(
            f"could not import module {module_name!r}", param_hint="APP"
        ) from exc
    except Exception as exc:
        _not_loaded(f"importing module {module_name!r} failed", exc)
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError as exc:
            message = f"module {module_name!r} has no attribute {attribute!r}"
            raise click.BadParameter(message, param_hint="APP") from exc
    if not factory:
        if inspect.isroutine(value) or inspect.isclass(value):
            kind = "a class" if inspect.isclass(value) else "a function"
            message = f"APP is {kind} ({target}): pass --factory if it builds the app"
            raise click.BadParameter(message, param_hint="APP")
        return value
    if not callable(value):
        raise click.BadParameter(f"--factory: {value!r} is not callable", param_hint="APP")
    try:
        return value()
    except Exception as exc:
        _not_loaded(f"the factory {target} failed", exc)


def _not_loaded(what: str, exc: Exception) -> NoReturn:
    """Print *exc*'s traceback, then fail as a usage error (exit code 2) that says *what*."""
    click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
    message = f"{what}: {type(exc).__name__}: {exc} (traceback above)"
    raise click.BadParameter(message, param_hint="APP") from exc


def bus_of(target: Any) -> EventBus:
    """The `EventBus` of an app (installed with ``bus.install(app)``), or *target* itself."""
    if isinstance(target, EventBus):
        return target
    try:
        return EventBus.of(target)
    except BusNotInstalledError:
        raise click.BadParameter(
            f"{target!r} is neither an EventBus nor an app with one installed (bus.install(app))",
            param_hint="APP",
        ) from None


def app_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command the ``APP`` argument and the ``--factory`` and ``--app-dir`` options
    that `load` takes, the same for every command that loads an app."""
    func = click.option(
        "--app-dir",
        metavar="DIR",
        default=".",
        show_default=True,
        help="Directory put first on sys.path to import APP from.",
    )(func)
    func = click.option(
        "--factory", is_flag=True, help="APP is a function returning the app: call it."
    )(func)
    return click.argument("app")(func)
