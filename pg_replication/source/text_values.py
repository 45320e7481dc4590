"""Turn a value's Postgres text form (what pgoutput sends) into the staged form the backfill's
COPY query produces for the same column, so both paths share one warehouse load expression.

Only the types whose backfill select is not the plain column need this: interval (exact fields),
money (plain number) and arrays (JSON, as ``to_json`` writes it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal

_ISO_INTERVAL = re.compile(
    r"^P(?:(-?\d+)Y)?(?:(-?\d+)M)?(?:(-?\d+)W)?(?:(-?\d+)D)?"
    r"(?:T(?:(-?\d+)H)?(?:(-?\d+)M)?(?:(-?\d+(?:\.\d+)?)S)?)?$"
)


def interval_from_iso(text: str) -> str:
    """'P1Y2M3DT4H5M6.789S' (IntervalStyle iso_8601) -> '14 months 3 days 14706789000 microseconds'."""
    m = _ISO_INTERVAL.match(text)
    if not m:
        raise ValueError(f"not an ISO 8601 interval: {text!r}")
    y, mo, w, d, h, mi, s = m.groups()
    months = int(y or 0) * 12 + int(mo or 0)
    days = int(w or 0) * 7 + int(d or 0)
    micros = int(h or 0) * 3_600_000_000 + int(mi or 0) * 60_000_000 + int(Decimal(s or 0) * 1_000_000)
    return f"{months} months {days} days {micros} microseconds"


def money_to_number(text: str) -> str:
    """'-$92,233,720,368,547,758.08' (lc_monetary=C) -> '-92233720368547758.08'."""
    return text.replace("$", "").replace(",", "")


def parse_array(text: str) -> list:
    """A Postgres array literal -> nested lists of str / None. Raises ValueError when malformed."""
    if not text:
        raise ValueError("empty array literal")
    if text.startswith("["):  # explicit bounds, e.g. [2:3]={1,2}: the bounds are not kept
        text = text[text.index("=") + 1 :]
    pos = 0
    n = len(text)

    def parse_level() -> list:
        nonlocal pos
        if text[pos] != "{":
            raise ValueError(f"expected '{{' at {pos} in {text!r}")
        pos += 1
        items: list = []
        if pos < n and text[pos] == "}":
            pos += 1
            return items
        while True:
            if pos >= n:
                raise ValueError(f"unterminated array {text!r}")
            ch = text[pos]
            if ch == "{":
                items.append(parse_level())
            elif ch == '"':
                pos += 1
                buf = []
                while True:
                    if pos >= n:
                        raise ValueError(f"unterminated quoted element in {text!r}")
                    c = text[pos]
                    if c == "\\":
                        if pos + 1 >= n:
                            raise ValueError(f"unterminated quoted element in {text!r}")
                        buf.append(text[pos + 1])
                        pos += 2
                    elif c == '"':
                        pos += 1
                        break
                    else:
                        buf.append(c)
                        pos += 1
                items.append("".join(buf))
            else:
                start = pos
                while pos < n and text[pos] not in ",}":
                    pos += 1
                raw = text[start:pos].strip(" \t\n\r\v\f")  # Postgres's array_isspace, not str.isspace
                items.append(None if raw == "NULL" else raw)
            if pos >= n:
                raise ValueError(f"unterminated array {text!r}")
            if text[pos] == ",":
                pos += 1
            elif text[pos] == "}":
                pos += 1
                return items
            else:
                raise ValueError(f"unexpected {text[pos]!r} at {pos} in {text!r}")

    result = parse_level()
    if pos != n:
        raise ValueError(f"trailing characters in array {text!r}")
    return result


def _float_json(x: str) -> object:
    return x if x in ("NaN", "Infinity", "-Infinity") else float(x)


ELEMENT_TO_JSON: dict[str, Callable[[str], object]] = {
    "int": int,
    "float": _float_json,
    "bool": lambda x: x == "t",
    "json": json.loads,
    "text": str,
}


_CONTROL = re.compile(r"[\x00-\x1f]")


def _fast_json(inner: str, kind: str) -> str | None:
    """The JSON of a 1-D array literal without quoted elements, built by string operations;
    None when the literal needs the full parser (the hot path of CDC decoding)."""
    if kind == "int":
        return "[" + inner.replace("NULL", "null") + "]"
    if kind == "float":
        return None if ("N" in inner or "I" in inner) else "[" + inner + "]"
    if kind == "bool":
        return "[" + inner.replace("NULL", "null").replace("t", "true").replace("f", "false") + "]"
    if kind == "text" and not _CONTROL.search(inner):
        items = inner.split(",")
        if "NULL" in items:
            return json.dumps([None if x == "NULL" else x for x in items], ensure_ascii=False, separators=(",", ":"))
        return '["' + '","'.join(items) + '"]'
    return None


def array_to_json(element_kind: str) -> Callable[[str], str]:
    """A converter from an array literal to the JSON ``to_json`` writes for it."""
    convert = ELEMENT_TO_JSON[element_kind]

    def walk(items: list) -> list:
        return [walk(x) if isinstance(x, list) else (None if x is None else convert(x)) for x in items]

    def to_json(text: str) -> str:
        # Unquoted, one-dimensional, default bounds: most arrays in practice.
        if text[0] == "{" and '"' not in text and "\\" not in text and text.find("{", 1) < 0:
            inner = text[1:-1]
            if not inner:
                return "[]"
            fast = _fast_json(inner, element_kind)
            if fast is not None:
                return fast
        return json.dumps(walk(parse_array(text)), ensure_ascii=False, separators=(",", ":"))  # to_json's spacing

    to_json.element_kind = element_kind  # type: ignore[attr-defined]  # the compiled path's cue (column_changes.py)
    return to_json
