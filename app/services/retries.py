"""When to retry an upstream call, and how long to wait first (shared by the SDK and raw clients)."""

import email.utils
import random
import time
from collections.abc import Mapping

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter: about 0.5 s, 1 s, 2 s ... at most 8 s."""
    return float(min(0.5 * 2**attempt, 8.0) * (0.75 + random.random() / 2))


def retry_delay(status: int | None, headers: Mapping[str, str] | None, attempt: int) -> float | None:
    """Seconds to wait before retrying, or None when a retry cannot help.

    `status` None means the connection failed or timed out. The upstream's
    `x-should-retry`, `retry-after-ms` and `retry-after` headers are honoured.
    """
    if status is None:
        return backoff(attempt)
    headers = headers or {}
    if status not in RETRYABLE_STATUS or headers.get("x-should-retry") == "false":
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(float(ms) / 1000, 0.0)
        except ValueError:
            pass
    if value := headers.get("retry-after"):
        try:
            return max(float(value), 0.0)
        except ValueError:
            try:
                parsed = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return backoff(attempt)
            return max(parsed.timestamp() - time.time(), 0.0)
    return backoff(attempt)
