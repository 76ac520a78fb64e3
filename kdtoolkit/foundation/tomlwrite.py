"""A small TOML writer for resolved recipes (tables, arrays of tables, scalars).

Written here because the standard library reads TOML but does not write it,
and a resolved recipe only holds plain values.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) else json.dumps(k)


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if math.isnan(v):
            return "nan"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_scalar(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def dumps(data: dict[str, Any]) -> str:
    """Serialise ``data`` as TOML. ``None`` values are omitted (TOML has no null)."""
    lines: list[str] = []
    _table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _table(d: dict[str, Any], path: list[str], lines: list[str], header: str | None = None) -> None:
    if header is not None:
        lines.append("")
        lines.append(header)
    nested = []
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict) or _is_table_array(v):
            nested.append((k, v))
        else:
            lines.append(f"{_key(k)} = {_scalar(v)}")
    for k, v in nested:
        p = path + [_key(k)]
        if isinstance(v, dict):
            _table(v, p, lines, "[" + ".".join(p) + "]")
        else:
            for item in v:
                _table(item, p, lines, "[[" + ".".join(p) + "]]")
