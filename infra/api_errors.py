"""One Google API request with retries, for both clients (infra/tpu_api.py, infra/compute_api.py): which
answers are retried (429, 5xx, a deadline, a dropped connection), which are final, and how each reads on one
line. google.api_core (which pulls grpc and requests) loads only when a request is made."""

from __future__ import annotations

from typing import Callable, TypeVar

from actfleet.errors import ActfleetError
from actfleet.formatting import one_line
from actfleet.retry import retry

T = TypeVar("T")


class Transient(Exception):
    """A request failed in a way another try may not (429, 5xx, timeout, dropped connection): its message."""


def retryable_statuses() -> tuple[type[Exception], ...]:
    from google.api_core import exceptions as gexc

    return (
        gexc.TooManyRequests,
        gexc.InternalServerError,
        gexc.BadGateway,
        gexc.ServiceUnavailable,
        gexc.GatewayTimeout,
        gexc.DeadlineExceeded,
    )


def call(
    fn: Callable[[], T],
    *,
    api: str,
    host: str,
    what: str,
    error_line: Callable[[str, Exception], str],
    count: Callable[[], None],
    attempts: int,
    base: float,
    cap: float,
    missing_ok: bool = False,
    on_conflict: Callable[[], T] | None = None,
) -> T:
    """fn() with retries. A 404 is None when `missing_ok`; a 409 is on_conflict() when given; any other API
    error is an ActfleetError (`error_line` writes it: "<api>: <what>: <code> <status>: <message>"). `count`
    is called once per attempt (the clients count their requests)."""
    import requests
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    def attempt() -> T:
        count()
        try:
            return fn()
        except gexc.NotFound as e:
            if missing_ok:
                return None  # type: ignore[return-value]
            raise ActfleetError(error_line(what, e)) from None
        except gexc.Conflict as e:
            if on_conflict is not None:
                return on_conflict()
            raise ActfleetError(error_line(what, e)) from None
        except retryable_statuses() as e:
            raise Transient(error_line(what, e)) from None
        except gexc.GoogleAPICallError as e:
            raise ActfleetError(error_line(what, e)) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, auth_exc.TransportError) as e:
            raise Transient(f"{api}: {what}: cannot reach {host}: {one_line(e)}") from None
        except auth_exc.RefreshError as e:
            raise ActfleetError(
                f"{api}: {what}: the credentials could not be refreshed: {one_line(e)} "
                "(run `gcloud auth application-default login`)"
            ) from None

    try:
        return retry(attempt, attempts=attempts, base=base, cap=cap, retryable=(Transient,))
    except Transient as e:
        raise ActfleetError(f"{e} (gave up after {attempts} attempts)") from None
