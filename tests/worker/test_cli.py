"""The ``fastapi-eventbus`` command line: ``handlers``, and the ``worker`` command's errors.

The worker command's normal runs (signals, exit codes) are in `test_sqs_process` and
`test_pubsub_worker`, where it runs in another process; so does one run here, for
``--max-message-bytes``.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fastapi_eventbus import Event
from fastapi_eventbus.cli import main
from fastapi_eventbus.wire import sqs_body
from fastapi_eventbus.worker import PubSubSource, SQSSource, Worker
from tests.forwarders._moto import REGION, Moto
from tests.worker._helpers import (
    AWS_ENV,
    counts,
    create_queue,
    send_raw,
    sqs_options,
    wait_for,
    worker_process,
)
from tests.worker.shop import execute

HANDLERS_OF_TARGETS_APP = """\
Handlers
  order.*
    tests.worker.targets.audit  (async, timeout 60s)
      depends on tests.worker.targets.settings
  cat.*
    tests.worker.targets.audit  (async, timeout 60s)
      depends on tests.worker.targets.settings
  order.placed
    tests.worker.targets.send_mail  (sync, in the threadpool, timeout 2.5s, up to 3 tries)
      depends on tests.worker.targets.Mailer

Forwarders
  order.*
    <EchoForwarder 'echo'>
  cat.*
    <EchoForwarder 'echo'>
"""


@pytest.fixture(autouse=True)
def restore_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command puts ``--app-dir`` on ``sys.path``: undo that after each test."""
    monkeypatch.setattr(sys, "path", [*sys.path])


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_handlers_lists_patterns_handlers_dependencies_and_forwarders() -> None:
    assert invoke("handlers", "tests.worker.targets:app") == (0, HANDLERS_OF_TARGETS_APP)


def test_handlers_takes_a_bus_too() -> None:
    assert invoke("handlers", "tests.worker.targets:empty") == (
        0,
        "Handlers\n  (none)\n\nForwarders\n  (none)\n",
    )


def test_handlers_takes_an_app_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    code, output = invoke("handlers", "targets:app", "--app-dir", "tests/worker")
    monkeypatch.delitem(sys.modules, "targets")  # imported under that name by the command
    assert code == 0
    assert "    targets.send_mail  (sync, in the threadpool, timeout 2.5s, up to 3 tries)" in output


def test_handlers_of_the_example_apps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "ORDERS_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/123456789012/orders"
    )
    code, web = invoke("handlers", "examples.worker.app:create_app", "--factory")
    assert code == 0
    assert "Handlers\n  (none)\n" in web
    assert "  order.*\n    <SQSForwarder 'SQSForwarder' queue_url=" in web
    code, worker = invoke("handlers", "examples.worker.app:create_worker_app", "--factory")
    assert code == 0
    assert "    examples.worker.app.create_worker_app.<locals>.send_receipt" in worker
    assert "      depends on examples.worker.app.get_db" in worker
    assert worker.endswith("Forwarders\n  (none)\n")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("tests.worker.targets", "is not of the form 'module:attribute'"),
        ("tests.worker.nope:app", "could not import module 'tests.worker.nope'"),
        ("tests.worker.targets:missing", "has no attribute 'missing'"),
        ("tests.worker.targets:nothing", "42 is neither an EventBus nor an app"),
    ],
)
@pytest.mark.parametrize("command", ["handlers", "worker"])
def test_a_bad_app_is_a_usage_error(target: str, message: str, command: str) -> None:
    options = ["--sqs", "https://sqs.eu-west-1.amazonaws.com/1/q"] if command == "worker" else []
    code, output = invoke(command, target, *options)
    assert code == 2
    assert "Invalid value for APP" in output
    assert message in output


@pytest.mark.parametrize("command", ["handlers", "worker"])
def test_a_module_that_fails_to_import_is_a_usage_error_with_its_traceback(command: str) -> None:
    options = ["--sqs", "https://sqs.eu-west-1.amazonaws.com/1/q"] if command == "worker" else []
    code, output = invoke(command, "tests.worker.broken:app", *options)
    assert code == 2  # as documented for "an APP that cannot be loaded", not 1
    assert 'tests/worker/broken.py", line 5' in output  # the traceback, where it failed
    assert (
        "Invalid value for APP: importing module 'tests.worker.broken' failed: "
        "ModuleNotFoundError: No module named 'no_such_dependency' (traceback above)"
    ) in output


@pytest.mark.parametrize("command", ["handlers", "worker"])
def test_a_factory_without_factory_says_to_pass_it(command: str) -> None:
    options = ["--sqs", "https://sqs.eu-west-1.amazonaws.com/1/q"] if command == "worker" else []
    code, output = invoke(command, "tests.worker.targets:create_app", *options)
    assert code == 2
    assert (
        "APP is a function (tests.worker.targets:create_app): pass --factory if it builds the app"
    ) in output


def test_a_factory_with_factory_loads() -> None:
    assert invoke("handlers", "tests.worker.targets:create_app", "--factory") == (
        0,
        HANDLERS_OF_TARGETS_APP,
    )


def test_a_factory_that_fails_is_a_usage_error_with_its_traceback() -> None:
    code, output = invoke("handlers", "tests.worker.targets:failing_factory", "--factory")
    assert code == 2
    assert 'raise RuntimeError("no settings")' in output
    assert (
        "the factory tests.worker.targets:failing_factory failed: RuntimeError: no settings"
    ) in output


def test_factory_needs_something_to_call() -> None:
    code, output = invoke("handlers", "tests.worker.targets:nothing", "--factory")
    assert code == 2
    assert "--factory: 42 is not callable" in output


@pytest.mark.parametrize(
    "options",
    [
        [],
        [
            "--sqs",
            "https://sqs.eu-west-1.amazonaws.com/1/q",
            "--pubsub",
            "projects/p/subscriptions/s",
        ],
    ],
    ids=["neither", "both"],
)
def test_the_worker_needs_exactly_one_source(options: list[str]) -> None:
    code, output = invoke("worker", "tests.worker.targets:app", *options)
    assert code == 2
    assert "pass exactly one of --sqs QUEUE_URL and --pubsub SUBSCRIPTION" in output


def test_the_worker_reports_bad_settings() -> None:
    code, output = invoke("worker", "tests.worker.targets:app", "--pubsub", "orders")
    assert code == 2  # a bad command line (it was 1, as for a failure at run time)
    assert "Error: subscription must be a full path" in output


def test_max_message_bytes_must_be_at_least_1() -> None:
    options = ["--sqs", "https://sqs.eu-west-1.amazonaws.com/1/q", "--max-message-bytes", "0"]
    code, output = invoke("worker", "tests.worker.targets:app", *options)
    assert code == 2
    assert "Invalid value for '--max-message-bytes'" in output


def test_max_message_bytes_defaults_to_the_workers_default() -> None:
    worker = main.commands["worker"]
    (option,) = [param for param in worker.params if param.name == "max_message_bytes"]
    assert option.default == inspect.signature(Worker).parameters["max_message_bytes"].default


@pytest.mark.slow
def test_max_message_bytes_reaches_the_worker(moto: Moto, db: Path, tmp_path: Path) -> None:
    queue_url = asyncio.run(create_queue(moto, "limits"))
    options = [*sqs_options(moto, queue_url), "--max-message-bytes", "300"]
    options += ["--on-undecodable", "delete"]
    body = sqs_body(Event(name="order.placed", payload={"item": "x" * 400}))
    with worker_process("tests.worker.shop:worker_app", *options, log=tmp_path / "w.log") as worker:
        raw_id = asyncio.run(send_raw(moto, queue_url, body))
        wait_for(lambda: raw_id in worker.output(), what="the too-large message's log line")
        wait_for(lambda: asyncio.run(counts(moto, queue_url)) == (0, 0), what="an empty queue")
        assert worker.terminate() == 0, worker.output()
    line = next(line for line in worker.output().splitlines() if raw_id in line)
    assert "ERROR" in line
    assert f"is too large to decode ({len(body)} bytes, over max_message_bytes=300)" in line
    assert line.endswith("deleting it")
    assert execute(db, "SELECT * FROM handled") == []


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Worker]:
    """The workers the ``worker`` command builds, which it then does not run."""
    workers: list[Worker] = []

    async def serve(runner: Worker) -> bool:
        workers.append(runner)
        return True

    monkeypatch.setattr("fastapi_eventbus.cli._worker._serve", serve)
    return workers


def test_visibility_timeout_reaches_the_sqs_source(served: list[Worker]) -> None:
    options = ["--sqs", "https://sqs.eu-west-1.amazonaws.com/1/q", "--visibility-timeout", "60"]
    assert invoke("worker", "tests.worker.targets:app", *options) == (0, "")
    (runner,) = served
    assert isinstance(runner.source, SQSSource)
    assert (runner.source.visibility_timeout, runner.source.extend_interval) == (60, 30.0)


def test_ack_deadline_reaches_the_pubsub_source(served: list[Worker]) -> None:
    options = ["--pubsub", "projects/p/subscriptions/orders", "--ack-deadline", "120"]
    assert invoke("worker", "tests.worker.targets:app", *options) == (0, "")
    (runner,) = served
    assert isinstance(runner.source, PubSubSource)
    assert (runner.source.ack_deadline, runner.source.extend_interval) == (120, 60.0)


@pytest.mark.parametrize(
    ("options", "ordered"), [([], None), (["--ordered"], True), (["--unordered"], False)]
)
def test_ordered_reaches_the_pubsub_source(
    served: list[Worker], options: list[str], ordered: bool | None
) -> None:
    source = ["--pubsub", "projects/p/subscriptions/orders"]
    assert invoke("worker", "tests.worker.targets:app", *source, *options) == (0, "")
    (runner,) = served
    assert isinstance(runner.source, PubSubSource)
    assert runner.source.ordered is ordered


@pytest.mark.parametrize("policy", ["retry", "delete"])
def test_on_unhandled_reaches_the_worker(served: list[Worker], policy: str) -> None:
    options = ["--sqs", "https://sqs.eu-west-1.amazonaws.com/1/q", "--on-unhandled", policy]
    assert invoke("worker", "tests.worker.targets:app", *options) == (0, "")
    assert [runner.on_unhandled for runner in served] == [policy]


def test_on_unhandled_defaults_to_the_workers_default() -> None:
    worker = main.commands["worker"]
    (option,) = [param for param in worker.params if param.name == "on_unhandled"]
    assert option.default == inspect.signature(Worker).parameters["on_unhandled"].default


def test_without_the_options_there_is_no_heartbeat(served: list[Worker]) -> None:
    for source in (
        ["--sqs", "https://sqs.eu-west-1.amazonaws.com/1/q"],
        ["--pubsub", "projects/p/subscriptions/orders"],
    ):
        assert invoke("worker", "tests.worker.targets:app", *source) == (0, "")
    assert [runner.source.extend_interval for runner in served] == [None, None]


@pytest.mark.parametrize(
    ("option", "value"),
    [("--visibility-timeout", "0"), ("--visibility-timeout", "43201"), ("--ack-deadline", "9")],
)
def test_heartbeat_options_out_of_range_are_usage_errors(option: str, value: str) -> None:
    source = ["--pubsub", "projects/p/subscriptions/orders"] if option == "--ack-deadline" else []
    source = source or ["--sqs", "https://sqs.eu-west-1.amazonaws.com/1/q"]
    code, output = invoke("worker", "tests.worker.targets:app", *source, option, value)
    assert code == 2
    assert f"Invalid value for '{option}'" in output


@pytest.mark.parametrize(
    ("source", "option", "broker"),
    [
        (
            ["--sqs", "https://sqs.eu-west-1.amazonaws.com/1/q"],
            ["--ack-deadline", "30"],
            "--pubsub",
        ),
        (
            ["--sqs", "https://sqs.eu-west-1.amazonaws.com/1/q"],
            ["--emulator-host", "h:1"],
            "--pubsub",
        ),
        (["--pubsub", "projects/p/subscriptions/o"], ["--endpoint-url", "http://h:1"], "--sqs"),
        (["--pubsub", "projects/p/subscriptions/o"], ["--visibility-timeout", "60"], "--sqs"),
        (["--pubsub", "projects/p/subscriptions/o"], ["--retry-delay", "1"], "--sqs"),
        (["--sqs", "https://sqs.eu-west-1.amazonaws.com/1/q"], ["--ordered"], "--pubsub"),
    ],
)
def test_an_option_of_the_other_broker_is_a_usage_error(
    source: list[str], option: list[str], broker: str, served: list[Worker]
) -> None:
    # Found: accepted and ignored: --endpoint-url meant for the Pub/Sub emulator pulled from
    # the default endpoint, with no word.
    code, output = invoke("worker", "tests.worker.targets:app", *source, *option)
    assert code == 2
    assert f"{option[0]} applies to {broker} only, not {source[0]}" in output
    assert served == []


@pytest.mark.parametrize(
    "options",
    [
        [
            "--sqs",
            "https://sqs.eu-west-1.amazonaws.com/1/q",
            "--retry-delay",
            "10",
            "--max-retry-delay",
            "5",
        ],
        ["--sqs", "https://sqs.eu-west-1.amazonaws.com/1/q", "--shutdown-timeout", "nan"],
        ["--sqs", "not-a-url"],
        ["--pubsub", "bad-subscription"],
    ],
    ids=["retry-delay-over-max", "shutdown-timeout-nan", "sqs-not-a-url", "pubsub-bad-path"],
)
def test_a_bad_option_value_is_a_usage_error(options: list[str], served: list[Worker]) -> None:
    """Found: exit status 1, as for a failure at run time; the docs say 2 for a bad
    command line."""
    code, output = invoke("worker", "tests.worker.targets:app", *options)
    assert code == 2
    assert "Error" in output
    assert served == []


def test_the_worker_exits_1_when_its_queue_does_not_exist(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    queue_url = f"{moto.endpoint}/123456789012/no-such-queue"
    options = ["--endpoint-url", moto.endpoint, "--region", REGION, "--wait-time", "0"]
    code, output = invoke("worker", "tests.worker.targets:app", "--sqs", queue_url, *options)
    assert code == 1
    assert "NonExistentQueue" in output


def test_the_command_is_installed() -> None:
    script = Path(sys.executable).with_name("fastapi-eventbus")
    if not script.exists():
        pytest.skip("the package is not installed in this environment (pip install -e .)")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "worker" in result.stdout
    assert "handlers" in result.stdout


def test_python_m_runs_the_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastapi_eventbus", "worker", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: fastapi-eventbus worker [OPTIONS] APP")
