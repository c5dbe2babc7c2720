"""Reason codes of the crawl and the network guard, and the text markers that carry them.

A blocked download comes back from img2dataset only as an error message string, so the worker's
guard raises its refusal with a stable marker in the status line (`HTTP Error 403: cnclip-guard
network:blocked_address 127.0.0.2`); `reason_from_error_message` turns such a message back into a
reason code.
"""

from __future__ import annotations

from typing import Optional

BAD_URL = "network:bad_url"
UNSUPPORTED_SCHEME = "network:unsupported_scheme"
BLOCKED_ADDRESS = "network:blocked_address"
DNS_FAILED = "network:dns_failed"
CONNECT_FAILED = "network:connect_failed"
TLS_FAILED = "network:tls_failed"  # certificate or handshake: retrying will not help
TIMEOUT = "network:timeout"
TOO_LARGE = "network:too_large"
TOO_MANY_REDIRECTS = "network:too_many_redirects"
RATE_LIMITED = "network:rate_limited"  # HTTP 429
SERVER_ERROR = "network:server_error"  # HTTP 5xx
HTTP_ERROR = "network:http_error"  # other 4xx
HOST_BUSY = "network:host_busy"  # the per-host queue did not free a slot in time
TRUNCATED = "network:truncated"  # the connection closed before the body reached its Content-Length
BAD_RESPONSE = "network:bad_response"  # a header line too long, too many or too large headers, a garbled status line
LOCAL_FILE_NOT_ALLOWED = "network:local_file_not_allowed"  # file:// outside download.allow_local_files
NOT_REGULAR_FILE = "network:not_regular_file"  # a file:// URL naming a FIFO, device, socket or folder
LOCAL_FILE_UNREADABLE = "network:local_file_unreadable"  # a file:// URL naming a missing or unreadable file
ROBOTS_DISALLOWED = "politeness:robots_disallowed"
CRAWL_DELAY_TOO_LONG = "politeness:crawl_delay_too_long"
OPTED_OUT = "politeness:opted_out"  # X-Robots-Tag / meta robots noai, noimageai on the page
NOT_HTML = "crawl:not_html"
HTTP_STATUS = "crawl:http_status"  # an archived response that was not a 2xx
PAGE_ERROR = "crawl:page_error"  # a bug or an input no rule foresaw: the page is skipped, the crawl goes on
BAD_RECORD = "crawl:bad_record"  # a WARC/WAT record that cannot be read

# Worth another attempt later: the same request may well succeed (what --retry-failed fetches again).
TRANSIENT = frozenset({DNS_FAILED, CONNECT_FAILED, TIMEOUT, RATE_LIMITED, SERVER_ERROR, HOST_BUSY, TRUNCATED})

MARKER = "cnclip-guard"
_MARKER_RE = MARKER + r"[:\s]+([a-z_]+:[a-z_]+)"
_HTTP_STATUS_RE = r"HTTP Error (\d{3})"
# Messages urllib/socket raise when the guard gave no marker (or before it answered), first match wins.
_MESSAGE_RULES = (
    (r"(?i)\[SSL|CERTIFICATE_VERIFY_FAILED|SSLError", TLS_FAILED),
    # A body cut short reaches urllib as IncompleteRead: counted as a timeout (transient).
    (r"(?i)timed out|TimeoutError|IncompleteRead", TIMEOUT),
    (r"(?i)Name or service not known|nodename nor servname|getaddrinfo failed|"
     r"Temporary failure in name resolution|No address associated", DNS_FAILED),
    (r"(?i)Connection refused|Connection reset|Remote end closed connection", CONNECT_FAILED),
)


def is_transient(reason: Optional[str]) -> bool:
    return reason in TRANSIENT


def reason_for_status(status: int) -> Optional[str]:
    """The reason code of an HTTP status that is not a success (None for 2xx/3xx)."""
    if status == 429:
        return RATE_LIMITED
    if status >= 500:
        return SERVER_ERROR
    if status >= 400:
        return HTTP_ERROR
    return None


def reason_from_error_message(message: Optional[str]) -> Optional[str]:
    """The reason code in img2dataset's recorded error message, or None when it names none
    (one message through `reason_of_message`, so there is one set of rules)."""
    if not message:
        return None
    import polars as pl

    return pl.select(reason_of_message(pl.lit(message, pl.String))).item()


def reason_of_message(message):
    """A polars expression: the reason code each error message names, or null.

    Guard markers map to their code; HTTP 429 / 5xx, timeouts, DNS and connection failures map to
    the transient codes. Anything else (404, X-Robots-Tag opt-out, decode errors) gives null: the
    caller keeps its own reason for those. Vectorized, so the attempts table of a build with many
    failures is read without a Python call per row.
    """
    import polars as pl

    status = message.str.extract(_HTTP_STATUS_RE, 1).cast(pl.Int32)
    by_status = (pl.when(status == 429).then(pl.lit(RATE_LIMITED))
                 .when(status >= 500).then(pl.lit(SERVER_ERROR))
                 .otherwise(pl.lit(None, pl.String)))
    by_rules = pl.lit(None, pl.String)
    for pattern, reason in reversed(_MESSAGE_RULES):  # built inside out: the first rule is tested first
        by_rules = pl.when(message.str.contains(pattern)).then(pl.lit(reason)).otherwise(by_rules)
    return pl.coalesce(message.str.extract(_MARKER_RE, 1),
                       pl.when(status.is_not_null()).then(by_status).otherwise(by_rules))
