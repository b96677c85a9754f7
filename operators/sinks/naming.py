"""Names of sink transactions and files, built from delimited fields that match exactly.

A sink names what it pre-commits after where it runs: the job, the operator,
the subtask, the run and the attempt, and the checkpoint or the writer's
sequence. Each text field is escaped so that it never holds the delimiter
between fields, a quote or ``+``: two different field values never give the
same text, and a name splits back into its fields unambiguously. A scope
("every transaction of this job's operator") is then matched by comparing
fields, never by a bare string prefix, so operators ``sink`` and ``sink-1``
or jobs ``a`` and ``a-b`` stay apart.

A field longer than its limit keeps its escaped head and ends with ``+``
and a 64-bit hash of the whole value: still one text per value, within the
length limits of PostgreSQL transaction names (200 bytes) and file names.

Example:
    >>> escape_field("feature-window", delimiter=":")
    'feature-window'
    >>> escape_field("feature-window", delimiter="-")
    'feature%2Dwindow'
    >>> escape_field("it's:here", delimiter=":")
    'it%27s%3Ahere'
    >>> len(escape_field("x" * 500, delimiter=":", limit=40))
    40

"""

from __future__ import annotations

import hashlib
import string

__all__ = ["escape_field", "split_fields"]

_PLAIN = frozenset(string.ascii_letters + string.digits + "_.-")
_HASH_CHARS = 16


def escape_field(text: str, *, delimiter: str, limit: int = 48) -> str:
    """Return ``text`` as one name field: no ``delimiter``, quote, ``%`` or ``+``; at most ``limit`` characters.

    Letters, digits, ``_``, ``.`` and ``-`` stay as they are (except the
    delimiter); every other byte of the UTF-8 text becomes ``%XX``. A longer
    result is cut and ends with ``+`` and a hash of ``text``.

    Args:
        text: the field's value.
        delimiter: the character between fields (it is always escaped).
        limit: the most characters the field may take (at least 24).

    Returns:
        The escaped field; equal fields come only from equal values.

    """
    escaped = "".join(
        char if char in _PLAIN and char != delimiter else "".join(f"%{byte:02X}" for byte in char.encode())
        for char in text
    )
    if len(escaped) <= limit:
        return escaped
    digest = hashlib.blake2b(text.encode(), digest_size=_HASH_CHARS // 2).hexdigest()
    head = escaped[: limit - _HASH_CHARS - 1]
    cut = head.rfind("%", max(len(head) - 2, 0))  # never split a %XX escape
    if cut != -1:
        head = head[:cut]
    return f"{head}+{digest}"


def split_fields(name: str, *, delimiter: str, count: int) -> list[str] | None:
    """Split ``name`` into its ``count`` fields, or return ``None`` if it has another number.

    Args:
        name: a name joined from escaped fields.
        delimiter: the character between fields.
        count: how many fields a name of this kind has.

    Returns:
        The fields, still escaped (compare them with :func:`escape_field` of a value).

    """
    fields = name.split(delimiter)
    return fields if len(fields) == count else None
