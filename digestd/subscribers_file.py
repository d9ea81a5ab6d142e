"""The subscribers file (``subscribers import`` / ``export``): parse, validate, write.

Parsing is all-or-nothing: every bad row is reported with its line, and nothing is
returned unless every row is valid.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from typing import Any

from .errors import ValidationError
from .models import Preferences, Subscriber
from .validation import PREF_FIELDS, check_name, check_preferences, normalize_email

MAX_FILE_BYTES = 20_000_000
MAX_ROWS = 200_000
ROW_KEYS = ("email", "name", *PREF_FIELDS)
_HEADER = re.compile(r"^[ \t]*\[\[[ \t]*subscriber[ \t]*\]\]", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Row:
    line: int
    email: str
    name: str
    prefs: Preferences


def parse(text: str, filename: str = "subscribers file") -> list[Row]:
    if len(text) > MAX_FILE_BYTES:
        raise ValidationError(f"{filename}: larger than {MAX_FILE_BYTES} bytes")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(f"{filename}: TOML syntax error: {exc}") from None
    extra = set(data) - {"subscriber"}
    problems: list[str] = [f"{filename}: unknown top-level key {k!r}" for k in sorted(extra)]
    rows_raw = data.get("subscriber", [])
    if not isinstance(rows_raw, list):
        raise ValidationError(f"{filename}: 'subscriber' must be an array of tables [[subscriber]]")
    if len(rows_raw) > MAX_ROWS:
        raise ValidationError(f"{filename}: more than {MAX_ROWS} subscribers")
    lines = [text.count("\n", 0, m.start()) + 1 for m in _HEADER.finditer(text)]
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(rows_raw):
        line = lines[index] if index < len(lines) else 0
        where = f"{filename}:{line}" if line else f"{filename}: subscriber {index + 1}"
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a table")
            continue
        try:
            row = _row(raw, line)
        except ValidationError as exc:
            label = raw.get("email") if isinstance(raw.get("email"), str) else None
            prefix = f"{where}: {label!r}: " if label else f"{where}: "
            problems.extend(prefix + p for p in exc.problems)
            continue
        if row.email.lower() in seen:
            problems.append(
                f"{where}: {row.email!r} already appears at line {seen[row.email.lower()]}"
            )
            continue
        seen[row.email.lower()] = line
        rows.append(row)
    if problems:
        raise ValidationError(problems)
    return rows


def _row(raw: dict[str, Any], line: int) -> Row:
    problems = [f"{key}: unknown key" for key in raw if key not in ROW_KEYS]
    email = name = ""
    prefs = Preferences()
    try:
        email = normalize_email(raw.get("email", ""))
    except ValidationError as exc:
        problems.extend(exc.problems)
    try:
        name = check_name(raw.get("name", ""))
    except ValidationError as exc:
        problems.extend(exc.problems)
    changes = {k: v for k, v in raw.items() if k in ROW_KEYS and k not in ("email", "name")}
    try:
        prefs = check_preferences(Preferences(), changes)
    except ValidationError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ValidationError(problems)
    return Row(line=line, email=email, name=name, prefs=prefs)


def subscriber_dict(sub: Subscriber) -> dict[str, Any]:
    p = sub.prefs
    out: dict[str, Any] = {
        "email": sub.email,
        "name": sub.name,
        "keywords": list(p.keywords),
        "exclude": list(p.exclude),
        "categories": list(p.categories),
        "authors": list(p.authors),
        "seed_papers": list(p.seed_papers),
        "max_papers": p.max_papers,
    }
    if p.min_upvotes is not None:
        out["min_upvotes"] = p.min_upvotes
    if p.timezone is not None:
        out["timezone"] = p.timezone
    if p.send_at is not None:
        out["send_at"] = p.send_at
    out["cadence"] = p.cadence
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # JSON string escaping is valid TOML basic-string escaping for these characters.
    return json.dumps(str(value), ensure_ascii=False)


def export_toml(subs: list[Subscriber]) -> str:
    parts = ["# digestd subscribers — edit and re-import with `digestd subscribers import FILE`\n"]
    for sub in subs:
        parts.append("\n[[subscriber]]\n")
        for key, value in subscriber_dict(sub).items():
            parts.append(f"{key} = {_toml_value(value)}\n")
    return "".join(parts)


def export_json(subs: list[Subscriber]) -> str:
    return json.dumps([subscriber_dict(s) for s in subs], ensure_ascii=False, indent=2) + "\n"
