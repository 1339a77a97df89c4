"""The project's short content ids: the first 16 hex characters of a sha256 (versions, fingerprints, config
digests, checkpoint ids). One helper, so that every id is made, and can be re-made, the same way."""

from __future__ import annotations

import hashlib
import json
from typing import Any

SHORT_HASH_CHARS = 16


def short_hash(data: str | bytes) -> str:
    """The short id of a text (UTF-8) or of bytes."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:SHORT_HASH_CHARS]


def json_hash(value: Any, *, compact: bool = False, default: Any = None) -> str:
    """The short id of ``value`` as JSON with sorted keys; ``compact``: no spaces and non-ASCII kept as is;
    ``default``: json's fallback for values it cannot encode (e.g. ``str``)."""
    options: dict[str, Any] = {"separators": (",", ":"), "ensure_ascii": False} if compact else {}
    return short_hash(json.dumps(value, sort_keys=True, default=default, **options))


def short_digest(digest: Any) -> str:
    """The short id of a running ``hashlib`` sha256 (for content fed in pieces)."""
    return digest.hexdigest()[:SHORT_HASH_CHARS]


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: the form that is hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_text(text: str) -> str:
    """Hex sha256 of ``text`` (UTF-8)."""
    return hashlib.sha256(text.encode()).hexdigest()
