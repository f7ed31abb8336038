"""Retries for transient failures only: S3 and network errors, preempted pods; never bad data.

Three layers, each for one kind of failure:

- ``TRANSIENT_RETRY_POLICY`` (a Dagster step ``RetryPolicy``, exponential backoff with
  jitter) on the I/O-heavy and GPU assets. Dagster applies it to any exception a step
  raises, to a step pod that the ``k8s_job_executor`` finds dead (preempted node), and to
  a step interrupted by SIGTERM (pod eviction).
- ``retry_only_transient`` (a decorator between ``@dg.asset`` and the function) narrows it
  to transient errors: everything else (a ValueError on bad data, a missing file, a bug,
  CUDA out of memory) becomes ``dg.Failure(allow_retries=False)``, which Dagster fails at
  once, whatever the policy says. Running bad data again gives the same error.
- Run retries (``run_retries`` in dagster.yaml, ``dagster/max_retries`` on a job) re-run a
  run whose worker died (lost machine, preempted run pod). With
  ``retry_on_asset_or_op_failure: false`` they leave step failures alone: those already
  had their step retries.

This module is Dagster glue (it builds a RetryPolicy and raises Failure).
"""

from __future__ import annotations

import errno
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import dagster as dg

F = TypeVar("F", bound=Callable[..., Any])

# errno values of OSErrors that a later attempt can clear. s3fs turns S3's SlowDown / 503 /
# ServiceUnavailable into EBUSY and InternalError / 500 into EREMOTEIO; the rest are
# network conditions (ESTALE: an NFS handle gone after a server failover).
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.EBUSY,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
        errno.ENETUNREACH,
        errno.EPIPE,
        errno.EREMOTEIO,
        errno.ESTALE,
        errno.ETIMEDOUT,
    }
)

# S3 / AWS error codes worth another attempt (throttling, server-side trouble).
TRANSIENT_AWS_CODES = frozenset(
    {
        "InternalError",
        "OperationAborted",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
    }
)

# HTTP statuses worth another attempt: timeout, rate limit, server and gateway errors.
TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@functools.cache
def _transient_types() -> tuple[type[BaseException], ...]:
    """Connection/timeout exception types of the HTTP stacks in use (those installed)."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from botocore import exceptions as boto

        types += [
            boto.HTTPClientError,  # EndpointConnectionError, ConnectTimeout, ReadTimeout, ...
            boto.ConnectionError,
            boto.IncompleteReadError,
            boto.ResponseStreamingError,
        ]
    except ImportError:
        pass
    try:
        import aiohttp  # s3fs's transport

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    except ImportError:
        pass
    try:
        import requests

        types += [
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ]
    except ImportError:
        pass
    try:
        import httpx  # huggingface_hub's transport

        types.append(httpx.TransportError)
    except ImportError:
        pass
    return tuple(types)


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries (botocore, aiohttp, requests, httpx), if any."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    for holder in (response, exc):
        for attribute in ("status_code", "status"):
            status = getattr(holder, attribute, None)
            if isinstance(status, int):
                return status
    return None


def _aws_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return code if isinstance(code, str) else None
    return None


def _is_transient_one(exc: BaseException) -> bool:
    if isinstance(exc, _transient_types()):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    if _aws_code(exc) in TRANSIENT_AWS_CODES:
        return True
    return _http_status(exc) in TRANSIENT_HTTP_STATUSES


def is_transient(exc: BaseException) -> bool:
    """True when another attempt may succeed: network/S3 trouble, here or as a cause.

    Follows explicit ``raise ... from`` causes (s3fs raises OSError from botocore's
    ClientError), not implicit context, so an error raised while handling a network
    error is judged on its own. Deliberately NOT transient: ValueError and other data
    errors, FileNotFoundError / PermissionError, CUDA out of memory (the same batch runs
    out again; lower the batch size), programming errors.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        if _is_transient_one(current):
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


def transient_retry_policy(
    max_retries: int = 3, delay: float = 30.0, jitter: bool = True
) -> dg.RetryPolicy:
    """Exponential backoff (Dagster's: delay * (2**n - 1), so 1x, 3x, 7x the delay) with
    +/- ``delay`` jitter, so that many runs throttled at once do not come back at once."""
    return dg.RetryPolicy(
        max_retries=max_retries,
        delay=delay,
        backoff=dg.Backoff.EXPONENTIAL,
        jitter=dg.Jitter.PLUS_MINUS if jitter else None,
    )


# Retries after 30 s, 90 s and 210 s (each +/- 30 s): long enough for S3 throttling to ease
# and for a preempted pod's step to be rescheduled on another node, short next to a
# fine-tune. sd_checkpoints resumes from its last saved training state on a retry.
TRANSIENT_RETRY_POLICY = transient_retry_policy()


def _permanent(exc: Exception) -> dg.Failure:
    return dg.Failure(
        description=f"{type(exc).__name__}: {exc} (not a transient error: not retried)",
        metadata={"error_type": type(exc).__name__, "transient": False},
        allow_retries=False,
    )


def retry_only_transient(fn: F) -> F:
    """Let the step's RetryPolicy see transient errors only; fail everything else at once.

    Place it between ``@dg.asset(..., retry_policy=TRANSIENT_RETRY_POLICY)`` and the
    function. It keeps the signature (Dagster reads context, config and resources from it).
    Dagster's own control flow (Failure, RetryRequested, interrupts) passes through.
    """
    passthrough = (dg.Failure, dg.RetryRequested, dg.DagsterError)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator_wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except passthrough:
                raise
            except Exception as exc:
                if is_transient(exc):
                    raise
                raise _permanent(exc) from exc

        return generator_wrapper  # type: ignore[return-value]

    if inspect.iscoroutinefunction(fn):
        raise TypeError("retry_only_transient does not support async asset functions")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except passthrough:
            raise
        except Exception as exc:
            if is_transient(exc):
                raise
            raise _permanent(exc) from exc

    return wrapper  # type: ignore[return-value]
