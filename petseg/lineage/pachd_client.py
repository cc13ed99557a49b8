"""A pachyderm-sdk client whose every call has a deadline.

pachyderm-sdk takes no timeout: `Client` builds all its stubs on one gRPC
channel (``Client._channel``, wrapped in its own metadata interceptor), and a
call to a pachd that accepted the connection but never answers waits for
ever. `Connection` wraps that channel in one more client interceptor
(`deadline_interceptor`) that sets every call's timeout, unary and streaming
alike, to the sooner of ``CALL_TIMEOUT`` and the caller's deadline, and
rebuilds the stubs on it (``Client._init_api``, what the client does itself
when its token changes). A call past the deadline fails at once, as
`Transient`.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator

from petseg.errors import ConfigError

CALL_TIMEOUT = 20.0
"""Seconds one call to pachd may take (a ModifyFile stream of a stage's outputs included)."""
CLEANUP_GRACE = 5.0
"""Seconds each clean-up call gets after a failed attempt, even past the deadline."""


CALL_DETAILS = ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
"""The fields of a gRPC call's details (``grpc.ClientCallDetails``)."""


class Transient(Exception):
    """A failure worth retrying: pachd unreachable, restarting or out of time."""


def deadline_interceptor():
    """A gRPC client interceptor that gives every call a timeout (its ``deadline`` and ``grace`` are set by the caller)."""
    import grpc

    class Deadline(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
        """Sets each call's timeout: the sooner of ``CALL_TIMEOUT`` and ``deadline``, but ``grace`` at least."""

        def __init__(self):
            self.deadline = float("inf")
            self.grace = 0.0

        def _details(self, details):
            left = max(min(CALL_TIMEOUT, self.deadline - time.monotonic()), self.grace)
            if left <= 0:
                raise Transient("no time left: the deadline for Pachyderm has passed")
            timeout = left if details.timeout is None else min(details.timeout, left)
            fields = {name: getattr(details, name, None) for name in CALL_DETAILS}
            return _CallDetails(**{**fields, "timeout": timeout})

        def intercept_unary_unary(self, continuation, details, request):
            return continuation(self._details(details), request)

        def intercept_unary_stream(self, continuation, details, request):
            return continuation(self._details(details), request)

        def intercept_stream_unary(self, continuation, details, request_iterator):
            return continuation(self._details(details), request_iterator)

        def intercept_stream_stream(self, continuation, details, request_iterator):
            return continuation(self._details(details), request_iterator)

    class _CallDetails(collections.namedtuple("_CallDetails", CALL_DETAILS), grpc.ClientCallDetails):
        pass

    return Deadline()


class Connection:
    """A pachyderm-sdk Client whose every call has a deadline (``deadline``: a ``time.monotonic()`` value)."""

    def __init__(self, address: str, deadline: float):
        import grpc
        from pachyderm_sdk import Client

        try:
            self.sdk = Client.from_pachd_address(address)
        except ValueError as exc:
            raise ConfigError(
                f"bad Pachyderm address {address!r} ({exc}): use host:port or grpc://host:port"
            ) from None
        self._deadline = deadline_interceptor()
        self._deadline.deadline = deadline
        # pachyderm-sdk builds every stub on self._channel; rebuild them on the same channel with deadlines.
        self.sdk._channel = grpc.intercept_channel(self.sdk._channel, self._deadline)
        self.sdk._init_api()

    @contextlib.contextmanager
    def grace(self) -> Iterator[None]:
        """Calls inside get ``CLEANUP_GRACE`` seconds each, even past the deadline (to clean up)."""
        self._deadline.grace = CLEANUP_GRACE
        try:
            yield
        finally:
            self._deadline.grace = 0.0

    def close(self) -> None:
        # pachyderm-sdk 2.12 has no public close(); its channel has one.
        channel = getattr(self.sdk, "_channel", None)
        if channel is not None:
            channel.close()
