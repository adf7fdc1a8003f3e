"""Private: the client lifecycle the AWS forwarders share (extra ``aws``).

`SQSForwarder`, `SNSForwarder` and `EventBridgeForwarder` each hold one
aiobotocore client of their service: checked credentials and `aws.ClientSettings`
from the constructor, the client opened by `AWSForwarder.start` on an exit stack,
closed by ``close`` and dropped by ``abandon`` on another event loop. What is
particular to a service (its calls, limits and entries) stays in its module; what
is particular to aiobotocore (the settings, the client, botocore's errors) stays
in `fastapi_eventbus._brokers.aws`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, AsyncExitStack
from typing import Any, ClassVar, Generic, TypeVar, cast

from fastapi_eventbus._brokers import aws
from fastapi_eventbus._retry import Retry
from fastapi_eventbus._settings import check_int
from fastapi_eventbus.exceptions import ConfigurationError, ForwarderError

from ._base import Forwarder, OnDeadLetter

ClientT = TypeVar("ClientT")
"""The aiobotocore client class of the forwarder's service (``SQSClient``...)."""


class AWSForwarder(Forwarder, Generic[ClientT]):
    """A forwarder that sends with one aiobotocore client of its service.

    A subclass sets `_service` and `_service_name` (and `_largest_message` if
    its service caps messages). Its ``__init__`` calls ``aws.require_sdk()``
    first (a missing extra is the real problem, whatever else is wrong), then
    checks its own arguments, then calls this one with the region its
    destination implies: that region comes from a queue URL or ARN once checked.
    """

    _service: ClassVar[aws.Service]
    """The botocore service of the client (``"sqs"``, ``"sns"``, ``"events"``)."""
    _service_name: ClassVar[str]
    """The service as error messages name it (``"SQS"``, ``"SNS"``, ``"EventBridge"``)."""
    _largest_message: ClassVar[int | None] = None
    """The largest *max_message_bytes* the service takes (None: no upper bound)."""

    def __init__(
        self,
        *,
        region_name: str | None,
        endpoint_url: str | None,
        aws_access_key_id: str | None,
        aws_secret_access_key: str | None,
        aws_session_token: str | None,
        max_message_bytes: int,
        retry: Retry | None,
        dead_letter: OnDeadLetter | None,
        name: str | None,
        verify_on_start: bool,
    ) -> None:
        check_int("max_message_bytes", max_message_bytes, 1, maximum=self._largest_message)
        super().__init__(
            retry=retry,
            dead_letter=dead_letter,
            max_message_bytes=max_message_bytes,
            name=name,
            verify_on_start=verify_on_start,
        )
        if (aws_access_key_id is None) != (aws_secret_access_key is None):
            raise ConfigurationError(
                "pass both aws_access_key_id and aws_secret_access_key, or neither"
            )
        self._settings = aws.ClientSettings(
            region_name,
            endpoint_url,
            aws_access_key_id,
            aws_secret_access_key,
            aws_session_token,
        )
        self._client: ClientT | None = None
        self._stack: AsyncExitStack | None = None

    @property
    def client(self) -> ClientT:
        """The aiobotocore client, once `start` ran (for hooks and extra calls)."""
        if self._client is None:
            raise ForwarderError(
                f"{self.name} has not started: use `async with forwarder:` or "
                "`await forwarder.ensure_started()` first"
            )
        return self._client

    async def start(self) -> None:
        """Create the aiobotocore client (no network call); a no-op if it exists."""
        if self._client is not None:
            return
        stack = AsyncExitStack()
        try:
            with translated(self):
                client = await self._settings.open_client(stack, 30, self._service)
        except BaseException:
            await stack.aclose()
            raise
        # open_client's overloads tie each service to its client class; the subclass
        # ties its _service to ClientT, which a type checker cannot see through.
        self._client = cast("ClientT", client)
        self._stack = stack

    async def close(self) -> None:
        """Close the client."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    def abandon(self) -> None:
        """Forget the client of another event loop (it cannot be closed from this one)."""
        self._client = self._stack = None

    def may_be_one_message(self, exc: BaseException) -> bool:
        """Only an error AWS gives for a value it refuses (``InvalidParameterValue``...): a
        missing queue or topic, or a denied access, is every message's."""
        return aws.about_a_message(exc)


def translated(
    forwarder: AWSForwarder[Any], context: str | None = None
) -> AbstractContextManager[None]:
    """Raise the `ForwarderError` for an aiobotocore/botocore error raised in the block.

    Its message starts with *context* (default: the forwarder's name) and names
    the forwarder's service where the error is that it could not be reached.
    """
    return aws.translated(context or forwarder.name, ForwarderError, forwarder._service_name)
