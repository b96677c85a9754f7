"""Credentials out of messages: connection strings, URIs and client settings shown with their secrets masked.

Errors, log lines, ``repr()`` and job metrics name the database, broker or
storage they concern, and end up in logs, Ray's dashboard and tickets; the
password must not come with them. These helpers mask it:

* :func:`redact_dsn`: a libpq connection string (``key=value`` pairs) or
  URI (``postgresql://user:password@host/db?sslpassword=...``);
* :func:`redact_uri`: a storage URI's user info (``s3://key:secret@bucket``)
  and its secret query parameters;
* :func:`redact_config`: a librdkafka (or any) settings mapping, every key
  naming a password, secret, token or private key;
* :func:`scrub`: any text, with given secret values replaced, for messages
  that quote a library's error (which may echo part of what it was given).

Example:
    >>> redact_dsn("host=db user=feat password='p w' dbname=f")
    "host=db user=feat password='***' dbname=f"
    >>> redact_dsn("postgresql://feat:hunter2@db:5432/f?sslpassword=x&sslmode=require")
    'postgresql://feat:***@db:5432/f?sslpassword=***&sslmode=require'
    >>> redact_uri("s3://AKIA:abc/def@bucket/chk?session_token=t")
    's3://AKIA:***@bucket/chk?session_token=***'
    >>> redact_config({"sasl.password": "x", "sasl.username": "u"})
    {'sasl.password': '***', 'sasl.username': 'u'}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["MASK", "dsn_secrets", "redact_config", "redact_dsn", "redact_uri", "scrub"]

MASK = "***"
"""What a secret is replaced with."""

_SECRET_WORDS = ("password", "passwd", "secret", "token", "credential", "private", "key.pem", "keystore",
                 "jaas.config")
_USERINFO = re.compile(r"(?P<head>^[A-Za-z][A-Za-z0-9+.\-]*://[^:/@?#]*:)(?P<secret>[^@?#]*)@")
_QUERY = re.compile(r"(?P<head>[?&](?P<name>[^=&#]+)=)(?P<secret>[^&#]*)")
_KEYWORD = re.compile(r"(?P<head>(?:^|\s)(?P<name>[A-Za-z_]+)\s*=\s*)(?P<secret>'(?:\\.|[^'\\])*'|[^\s']+)")


def _secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS) or lowered in ("access_key", "secret_key")


def redact_uri(uri: str) -> str:
    """``uri`` with the password of its user info and its secret query parameters masked."""
    masked = _USERINFO.sub(lambda m: f"{m['head']}{MASK}@", uri, count=1)
    return _QUERY.sub(lambda m: f"{m['head']}{MASK}" if _secret_name(m["name"]) else m[0], masked)


def redact_dsn(dsn: str) -> str:
    """A libpq connection string or URI with its passwords masked (``password``, ``sslpassword``...)."""
    if "://" in dsn:
        return redact_uri(dsn)

    def mask(match: re.Match[str]) -> str:
        if not _secret_name(match["name"]):
            return match[0]
        quoted = match["secret"].startswith("'")
        return f"{match['head']}{chr(39) + MASK + chr(39) if quoted else MASK}"

    return _KEYWORD.sub(mask, dsn)


def dsn_secrets(dsn: str) -> list[str]:
    """The secret values in a connection string or URI (to :func:`scrub` from messages that may quote them)."""
    found = []
    if "://" in dsn:
        userinfo = _USERINFO.search(dsn)
        if userinfo and userinfo["secret"]:
            found.append(userinfo["secret"])
        found += [m["secret"] for m in _QUERY.finditer(dsn) if _secret_name(m["name"]) and m["secret"]]
    else:
        for match in _KEYWORD.finditer(dsn):
            if _secret_name(match["name"]):
                value = match["secret"]
                found.append(value[1:-1].replace("\\'", "'").replace("\\\\", "\\") if value.startswith("'")
                             else value)
    return [s for s in found if s]


def redact_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with the value of every key naming a password, secret, token or private key masked."""
    return {key: MASK if _secret_name(str(key)) else value for key, value in config.items()}


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each (non-empty) secret replaced by :data:`MASK`."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
