"""IRI -> URI: the ASCII form of a URL that urllib and http.client can send.

Chinese sites link to paths like `/图片/猫 1.jpg` and hosts like `例子.中国`; browsers send them
percent-encoded (UTF-8) and IDNA-encoded, and http.client refuses anything else. Existing `%XX`
escapes and reserved characters are kept as they are, so encoding twice changes nothing.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


def _ascii_host(netloc: str) -> str:
    if netloc.isascii():
        return netloc
    userinfo, at, hostport = netloc.rpartition("@")
    host, colon, port = hostport, "", ""
    if not hostport.endswith("]") and ":" in hostport:
        host, colon, port = hostport.rpartition(":")
    labels = [label.encode("idna").decode("ascii") if not label.isascii() else label for label in host.split(".")]
    return f"{userinfo}{at}{'.'.join(labels)}{colon}{port}"


def to_uri(url: str) -> str:
    """Percent-encode non-ASCII, spaces and controls in path/query, IDNA-encode the host.

    Raises ValueError (UnicodeError is one) for a host IDNA cannot encode."""
    parts = urlsplit(url.strip())
    return urlunsplit((parts.scheme, _ascii_host(parts.netloc), quote(parts.path, safe=_PATH_SAFE),
                       quote(parts.query, safe=_QUERY_SAFE), quote(parts.fragment, safe=_QUERY_SAFE)))
