"""AUTOMATIC1111's prompt editing: ``[from:to:when]`` swaps text during sampling, ``[to:when]`` adds it,
``[from::when]`` removes it, ``[a|b|c]`` alternates every step. ``when`` < 1 is a fraction of the steps,
otherwise a step number. Square brackets that are none of these stay literal (attention syntax ``[word]``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)\s*$")


@dataclass
class _Edit:
    before: list
    after: list
    when: float


@dataclass
class _Alternate:
    options: list[list]


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside nested square brackets and escapes."""
    parts, depth, current, i = [], 0, "", 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current += text[i:i + 2]
            i += 2
            continue
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
        i += 1
    return [*parts, current]


def _parse(text: str) -> list:
    """A sequence of literal strings, _Edit and _Alternate nodes."""
    out: list = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i:i + 2])
            i += 2
            continue
        if text[i] == "[":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "\\":
                    j += 2
                    continue
                depth += text[j] == "["
                depth -= text[j] == "]"
                if depth == 0:
                    break
                j += 1
            if j < len(text):
                node = _bracket(text[i + 1:j])
                if node is not None:
                    out.append(node)
                    i = j + 1
                    continue
                out.append("[")  # literal: parse the inside normally
                i += 1
                continue
        out.append(text[i])
        i += 1
    return out


def _bracket(inner: str) -> _Edit | _Alternate | None:
    options = _split_top(inner, "|")
    if len(options) > 1:
        return _Alternate([_parse(o) for o in options])
    parts = _split_top(inner, ":")
    if len(parts) in (2, 3) and _NUMBER.match(parts[-1]):
        when = float(parts[-1])
        before = _parse(parts[0]) if len(parts) == 3 else []
        after = _parse(parts[-2])
        return _Edit(before, after, when)
    return None


def _render(nodes: list, step: int, steps: int) -> str:
    text = []
    for node in nodes:
        if isinstance(node, str):
            text.append(node)
        elif isinstance(node, _Edit):
            switch = node.when * steps if node.when < 1 else node.when
            text.append(_render(node.after if step > int(switch) else node.before, step, steps))
        else:
            text.append(_render(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(text)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """[(last step, text used up to it), ...] covering steps 1..steps, consecutive duplicates merged."""
    nodes = _parse(text)
    schedule: list[tuple[int, str]] = []
    for step in range(1, steps + 1):
        rendered = _render(nodes, step, steps)
        if schedule and schedule[-1][1] == rendered:
            schedule[-1] = (step, rendered)
        else:
            schedule.append((step, rendered))
    return schedule
