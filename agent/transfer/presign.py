"""SigV4 query signing of S3 GETs, done with ``hmac`` (≈ 20 µs a URL, where botocore's presigner takes ≈ 330 µs:
a cost paid per file on models of thousands of files). Used only once it reproduces botocore's own URL for a bucket
(:mod:`agent.transfer.s3` checks); botocore signs otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import time
import urllib.parse

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
