"""The network guard inside each download worker: a urllib opener for img2dataset's threads.

img2dataset fetches with `urllib.request.urlopen` from threads of the process it runs in; the
download stage runs it in its own worker processes (stages/download_lanes.py) and installs this
opener there with `urllib.request.install_opener`, so every request, and every redirect hop
(urllib follows redirects client-side, each hop a new `open` through these handlers), is checked
before a connection is made: the host resolved once, every address checked, the connection made
to the checked address (net/fetch.py, no second lookup), the host's turn awaited, robots.txt
read when obeyed, the size and time caps enforced. `file://` goes through `read_local_file`
under `download.allow_local_files` and the same caps; any other scheme (ftp:, data:) is refused.
The opener has no ProxyHandler, so no `http_proxy` in the environment can route around it.

A refusal is raised as an HTTPError whose message carries a stable marker, `HTTP Error 403:
cnclip-guard network:blocked_address 127.0.0.2`, which img2dataset records and
`reason_from_error_message` maps back to the reason code.
"""

from __future__ import annotations

import contextlib
import io
import urllib.error
import urllib.request
import urllib.response
from email.message import Message
from typing import Iterator

from cnclip.corpus.net.fetch import Response, fetch_once
from cnclip.corpus.net.local_files import file_subject, read_local_file
from cnclip.corpus.net.policy import STATUS_FOR, GuardConfig, HostPolicy, refusal_phrase
from cnclip.corpus.net.politeness import HostBusy
from cnclip.corpus.net.reasons import BLOCKED_ADDRESS, HOST_BUSY, MARKER, reason_for_status

_DROPPED_HEADERS = {"connection", "proxy-connection", "keep-alive", "proxy-authorization", "te", "trailer",
                    "transfer-encoding", "upgrade", "content-length", "host", "user-agent"}


class _GuardedHandler(urllib.request.BaseHandler):
    """http(s):// and file:// opened under the policy; every other scheme refused."""

    handler_order = 100  # before any default handler someone adds

    def __init__(self, policy: HostPolicy):
        self.policy = policy

    def _refuse(self, request: urllib.request.Request, reason: str, subject: str, detail: str):
        self.policy.count(reason)
        body = f"{MARKER}: {reason} {subject}\n{detail}\n".encode("utf-8", errors="replace")
        headers = Message()
        headers["Content-Type"] = "text/plain; charset=utf-8"
        headers["X-Cnclip-Guard"] = reason
        raise urllib.error.HTTPError(request.full_url, STATUS_FOR.get(reason, 403), refusal_phrase(reason, subject),
                                     headers, io.BytesIO(body))

    def _answer(self, request: urllib.request.Request, answer: Response, subject: str):
        if answer.reason:
            self._refuse(request, answer.reason, subject, answer.detail)
        status = answer.status or 0
        self.policy.count(reason_for_status(status) or ("redirect" if 300 <= status < 400 else "ok"))
        response = urllib.response.addinfourl(io.BytesIO(answer.body), answer.headers, request.full_url, status)
        response.msg = answer.reason_phrase  # what HTTPErrorProcessor reads, as urllib's own handler sets
        return response

    def http_open(self, request: urllib.request.Request):
        config, policy, url = self.policy.config, self.policy, request.full_url
        decision = policy.guard.check_url(url)
        if not decision.allowed:
            return self._refuse(request, decision.reason or BLOCKED_ADDRESS,
                                decision.address or decision.host or url[:80], decision.detail)
        refusal = policy.robots_refusal(url)
        if refusal:
            return self._refuse(request, refusal[0], decision.host, refusal[1])
        headers = {k: v for k, v in request.header_items() if k.lower() not in _DROPPED_HEADERS}
        # The recipe's user agent names the tool to image hosts, as robots.txt was read with it.
        headers |= {"User-Agent": config.user_agent, "Connection": "close"}
        try:
            with policy.limiter.slot(decision.host, config.per_host_max_wait):
                answer = fetch_once(policy.guard, decision, url, timeout=config.request_timeout,
                                    max_bytes=config.max_response_bytes, headers=headers,
                                    method=request.get_method())
        except HostBusy as err:
            return self._refuse(request, HOST_BUSY, decision.host, str(err))
        return self._answer(request, answer, decision.host)

    https_open = http_open

    def file_open(self, request: urllib.request.Request):
        url, config = request.full_url, self.policy.config
        answer = read_local_file(url, self.policy.local_roots, max_bytes=config.max_response_bytes,
                                 timeout=config.request_timeout)
        return self._answer(request, answer, file_subject(url))

    def unknown_open(self, request: urllib.request.Request):
        """ftp:, data: and the rest: refused as unsupported schemes, as the guard words it."""
        url = request.full_url
        decision = self.policy.guard.check_url(url)
        return self._refuse(request, decision.reason or BLOCKED_ADDRESS,
                            decision.address or decision.host or url[:80], decision.detail)


def guarded_opener(policy: HostPolicy) -> urllib.request.OpenerDirector:
    """An opener with the guard's handler, urllib's redirect and error handling, and nothing else
    (no proxy from the environment, no ftp, file or data handler of urllib's own)."""
    opener = urllib.request.OpenerDirector()
    for handler in (_GuardedHandler(policy), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPRedirectHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


@contextlib.contextmanager
def guarded_urlopen(config: GuardConfig) -> Iterator[HostPolicy]:
    """`urllib.request.urlopen` of this process goes through the guard while inside; the opener
    installed before (none, usually) comes back on exit."""
    policy = HostPolicy(config)
    previous = urllib.request._opener  # no public getter; install_opener(None) restores the default
    urllib.request.install_opener(guarded_opener(policy))
    try:
        yield policy
    finally:
        urllib.request.install_opener(previous)
