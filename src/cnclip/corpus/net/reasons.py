"""Reason codes of the crawl and the network guard, and the text markers that carry them.

A blocked download comes back from img2dataset only as an error message string, so the worker's
guard raises its refusal with a stable marker in the status line (`HTTP Error 403: cnclip-guard
network:blocked_address 127.0.0.2`); `reason_from_error_message` turns such a message back into a
reason code.
"""

from __future__ import annotations

import re
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
_MARKER_RE = re.compile(MARKER + r"[:\s]+([a-z_]+:[a-z_]+)")
_HTTP_STATUS_RE = re.compile(r"HTTP Error (\d{3})")
# Messages urllib/socket raise when the guard gave no marker (or before it answered).
_MESSAGE_RULES = (
    (re.compile(r"\[SSL|CERTIFICATE_VERIFY_FAILED|SSLError", re.I), TLS_FAILED),
    # A body cut short reaches urllib as IncompleteRead: counted as a timeout (transient).
    (re.compile(r"timed out|TimeoutError|IncompleteRead", re.I), TIMEOUT),
    (re.compile(r"Name or service not known|nodename nor servname|getaddrinfo failed|"
                r"Temporary failure in name resolution|No address associated", re.I), DNS_FAILED),
    (re.compile(r"Connection refused|Connection reset|Remote end closed connection", re.I), CONNECT_FAILED),
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
    """The reason code in img2dataset's recorded error message, or None when it names none.

    Guard markers map to their code; HTTP 429 / 5xx, timeouts, DNS and connection failures map to
    the transient codes. Anything else (404, X-Robots-Tag opt-out, decode errors) gives None: the
    caller keeps its own reason for those.
    """
    if not message:
        return None
    found = _MARKER_RE.search(message)
    if found:
        return found.group(1)
    status = _HTTP_STATUS_RE.search(message)
    if status:
        code = int(status.group(1))
        return reason_for_status(code) if code == 429 or code >= 500 else None
    for pattern, reason in _MESSAGE_RULES:
        if pattern.search(message):
            return reason
    return None
