"""SigV4 query signing of S3 GETs, done with ``hmac`` (≈ 20 µs a URL, where botocore's presigner takes ≈ 330 µs:
a cost paid per file on models of thousands of files). Used only once it reproduces botocore's own URL for a bucket
(:func:`fast_presigner` checks, against a URL :mod:`agent.transfer.s3` has botocore make); botocore signs otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

#: Presigned URLs are made per attempt; one attempt is one part (≤ 64 MiB), so minutes are plenty.
PRESIGN_SECONDS = 900

_QUERY_SAFE = "-_.~"


@functools.lru_cache(maxsize=16)
def _signing_key(secret_key: str, date: str, region: str) -> bytes:
    key = hmac.digest(f"AWS4{secret_key}".encode(), date.encode(), "sha256")
    for part in (region, "s3", "aws4_request"):
        key = hmac.digest(key, part.encode(), "sha256")
    return key


def presign_get(*, scheme: str, host: str, path: str, region: str, access_key: str, secret_key: str,
                token: str | None, amz_date: str | None = None, expires: int = PRESIGN_SECONDS) -> str:
    """A presigned GET URL, as botocore's ``generate_presigned_url("get_object")`` makes it (SigV4, query auth).

    ``host`` is the Host header the request will carry (no default port); ``path`` is already percent-encoded,
    as S3 signs it (no normalisation); ``amz_date`` (``YYYYMMDDTHHMMSSZ``) defaults to now.
    """
    amz_date = amz_date or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    params = [("X-Amz-Algorithm", "AWS4-HMAC-SHA256"), ("X-Amz-Credential", f"{access_key}/{scope}"),
              ("X-Amz-Date", amz_date), ("X-Amz-Expires", str(expires)), ("X-Amz-SignedHeaders", "host")]
    if token is not None:
        params.append(("X-Amz-Security-Token", token))
    quote = urllib.parse.quote
    query = "&".join(f"{k}={v}" for k, v in sorted((quote(k, safe=_QUERY_SAFE), quote(v, safe=_QUERY_SAFE))
                                                   for k, v in params))
    canonical = f"GET\n{path}\n{query}\nhost:{host}\n\nhost\nUNSIGNED-PAYLOAD"
    to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    signature = hmac.new(_signing_key(secret_key, amz_date[:8], region), to_sign.encode(), "sha256").hexdigest()
    return f"{scheme}://{host}{path}?{query}&X-Amz-Signature={signature}"


def host_header(scheme: str, host: str, port: int | None) -> str:
    """The Host header for a URL's parts: the port only when it is not the scheme's default (as signed)."""
    name = f"[{host}]" if ":" in host else host
    return name if port is None or port == {"http": 80, "https": 443}.get(scheme) else f"{name}:{port}"


#: A key with characters that need encoding: the fast presigner must quote them as botocore does.
PROBE_KEY = "weightcache/probe é ~+=&?%.bin"
_QUERY_KEYS = {"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders",
               "X-Amz-Signature", "X-Amz-Security-Token"}


def fast_presigner(reference: str, credentials: Any) -> Callable[[str], str] | None:
    """A presigner that signs with :func:`presign_get`, if it reproduces ``reference`` exactly.

    ``reference`` is botocore's presigned URL for :data:`PROBE_KEY`: it shows where the bucket's objects live
    (scheme, host, the path before the key: path-style or virtual-hosted, any endpoint rule), the region and the
    credentials botocore signed with. Anything else in it (other query parameters, another algorithm or service,
    a signature we do not reproduce) means botocore knows something we do not: then None, and botocore signs.
    """
    u = urllib.parse.urlsplit(reference)
    query = dict(urllib.parse.parse_qsl(u.query, keep_blank_values=True))
    quoted = urllib.parse.quote(PROBE_KEY, safe="/~")
    scope = query.get("X-Amz-Credential", "").split("/")
    if (credentials is None or set(query) - _QUERY_KEYS or not u.path.endswith(quoted) or len(scope) != 5
            or scope[3:] != ["s3", "aws4_request"] or query.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256"
            or query.get("X-Amz-SignedHeaders") != "host" or not u.hostname):
        return None
    scheme, region, prefix = u.scheme, scope[2], u.path[: -len(quoted)]
    host = host_header(scheme, u.hostname, u.port)
    frozen = credentials.get_frozen_credentials()
    mine = presign_get(scheme=scheme, host=host, path=u.path, region=region, access_key=frozen.access_key,
                       secret_key=frozen.secret_key, token=frozen.token, amz_date=query.get("X-Amz-Date"),
                       expires=int(query.get("X-Amz-Expires", "0") or 0))
    if dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(mine).query, keep_blank_values=True)) != query:
        return None

    def presign(key: str) -> str:
        c = credentials.get_frozen_credentials()  # refreshed here when due (IRSA, instance profiles)
        return presign_get(scheme=scheme, host=host, path=prefix + urllib.parse.quote(key, safe="/~"),
                           region=region, access_key=c.access_key, secret_key=c.secret_key, token=c.token)

    return presign
