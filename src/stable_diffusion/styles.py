"""AUTOMATIC1111's prompt styles: named prompt and negative-prompt fragments kept in a ``styles.csv`` (columns
``name``, ``prompt``, ``negative_prompt``; the old ``text`` column is read as ``prompt``). A style's text replaces
its ``{prompt}`` placeholder with the prompt, or else is appended to it after ", "; several styles apply in
order, each to the result of the last."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge_prompt(style_text: str, prompt: str) -> str:
    """``prompt`` with one style's text applied, as A1111 does."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, styles: list[Style]) -> tuple[str, str]:
    for style in styles:
        prompt = merge_prompt(style.prompt, prompt)
        negative_prompt = merge_prompt(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt


def read_styles(path: str | Path) -> dict[str, Style]:
    """The styles of a styles.csv by name ({} when the file does not exist); a malformed file is a ValueError."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            rows = list(csv.DictReader(file, skipinitialspace=True))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a readable styles file ({e})") from None
    styles = {}
    for row in rows:
        name = (row.get("name") or "").strip()
        if not name:
            continue
        styles[name] = Style(name, row.get("prompt", row.get("text")) or "", row.get("negative_prompt") or "")
    return styles


def find_styles(names: list[str], library: dict[str, Style]) -> list[Style]:
    """The named styles in order; an unknown name is a ValueError listing what exists."""
    unknown = [n for n in names if n not in library]
    if unknown:
        known = ", ".join(sorted(library)) or "none"
        raise ValueError(f"unknown style {unknown[0]!r} (styles: {known})")
    return [library[n] for n in names]
