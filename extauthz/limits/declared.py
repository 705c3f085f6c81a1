"""The token count a request declares: a header, and/or a field of its JSON body.

Strict on purpose: the count decides how much quota is reserved and whether the
per-request cap is exceeded, so anything but one plain whole number is refused (400)
rather than guessed at. A request that declares nothing reserves nothing; its real
usage is charged when the access log reports it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from extauthz.policy import TokenSource

INVALID = "invalid_token_count"
MAX_DECLARED = 10**15  # beyond any real cap; larger numbers are refused as nonsense
_DIGITS = re.compile(r"[0-9]{1,16}")


class _Duplicate(ValueError):
    pass


def declared_tokens(
    headers: Mapping[str, str | tuple[str, ...]], body: bytes | None, source: TokenSource
) -> int | str:
    """The declared count (0 when none is declared), or ``INVALID``."""
    declared = 0
    if source.header is not None:
        raw = headers.get(source.header)
        if raw is not None:
            if isinstance(raw, tuple) or "," in raw:
                return INVALID  # two counts: which one would the upstream use?
            text = raw.strip()
            if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= MAX_DECLARED:
                return INVALID
            declared = int(text)
    if source.body_field is not None and body:
        found = _body_count(body, source.body_field)
        if isinstance(found, str):
            return found
        declared = max(declared, found)
    return declared


def _body_count(body: bytes, name: str) -> int | str:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        if keys.count(name) > 1:
            raise _Duplicate(name)  # parsers disagree on which copy wins: refuse both
        return dict(items)

    try:
        doc = json.loads(body, object_pairs_hook=pairs, parse_constant=lambda c: math.nan)
    except _Duplicate:
        return INVALID
    except (ValueError, RecursionError):
        return 0  # not JSON: this request declares nothing in its body
    if not isinstance(doc, dict) or name not in doc:
        return 0
    value = doc[name]
    if value is None:
        return 0  # an explicit null means "the upstream's default", as with a missing field
    if isinstance(value, bool) or not isinstance(value, int):
        return INVALID  # 1.5, "100", NaN, true
    if not 1 <= value <= MAX_DECLARED:
        return INVALID
    return value
