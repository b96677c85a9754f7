"""S3 checkpoint storage settings that travel with the storage URI to every actor of a job.

``pyarrow.fs`` reads the S3 settings of the process it runs in: credentials
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, a profile or an instance
role), the region (``AWS_REGION``, ``AWS_DEFAULT_REGION``) and the endpoint
(``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``), and the URI's own
``?endpoint_override=host:port&scheme=http&region=...``. A job's coordinator
and subtasks run in Ray worker processes, which inherit the environment Ray
was started with, not the driver's environment at submission. So the driver
writes what its own environment says into the URI the actors get, in the
forms ``pyarrow.fs.FileSystem.from_uri`` reads: the endpoint, scheme and
region as query parameters and the credentials as the URI's user info (the
secret percent-encoded). What the URI already says wins. The secret is masked
wherever the URI is shown (:func:`onceflow.redaction.redact_uri`).

Example:
    >>> env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-3",
    ...        "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s/cr+t"}
    >>> uri = with_s3_environment("s3://bucket/chk", env)
    >>> uri
    's3://AKIA:s%2Fcr%2Bt@bucket/chk?endpoint_override=127.0.0.1%3A9000&scheme=http&region=eu-west-3'
    >>> from onceflow.redaction import redact_uri
    >>> redact_uri(uri)
    's3://AKIA:***@bucket/chk?endpoint_override=127.0.0.1%3A9000&scheme=http&region=eu-west-3'
    >>> with_s3_environment("s3://bucket/chk?region=us-east-1", {"AWS_REGION": "eu-west-3"})
    's3://bucket/chk?region=us-east-1'
    >>> with_s3_environment("/data/chk", env)
    '/data/chk'
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

__all__ = ["with_s3_environment"]


def with_s3_environment(uri: str, environ: Mapping[str, str]) -> str:
    """``uri`` with the S3 settings of ``environ`` that it does not state itself (other URIs unchanged).

    Args:
        uri: the checkpoint storage, such as ``"s3://bucket/prefix"``.
        environ: the environment to read (the driver's ``os.environ``).

    Returns:
        The URI to give the job's actors.

    """
    parts = urlsplit(uri)
    if parts.scheme != "s3":
        return uri
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = {name for name, _ in query}
    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_override" not in given:
        where = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        query.append(("endpoint_override", where.netloc))
        if "scheme" not in given:
            query.append(("scheme", where.scheme))
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if region and "region" not in given:
        query.append(("region", region))
    netloc = parts.netloc
    key, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret and "@" not in netloc and not environ.get("AWS_SESSION_TOKEN"):
        netloc = f"{quote(key, safe='')}:{quote(secret, safe='')}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment))
