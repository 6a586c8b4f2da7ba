"""The Google API answers worth a retry (429, 5xx, a deadline), named once for both clients (infra/tpu_api.py,
infra/compute_api.py). A function, so google.api_core (which pulls grpc and requests) loads only when called."""

from __future__ import annotations


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
