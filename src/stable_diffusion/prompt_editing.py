"""AUTOMATIC1111's prompt editing: ``[from:to:when]`` swaps text during sampling, ``[to:when]`` adds it,
``[from::when]`` removes it, ``[a|b|c]`` alternates every step. ``when`` < 1 is a fraction of the steps,
otherwise a step number. Square brackets that are none of these stay literal (attention syntax ``[word]``), and
attention syntax nests inside edits as in A1111's grammar: ``[(red:1.3):blue:0.5]``.

The parser does bounded work: one pass pairs the brackets, and every character is then visited a fixed number
of times, so a prompt costs time linear in its length; brackets nested deeper than ``MAX_DEPTH`` are literal.

    >>> prompt_schedule("a [cat:dog:0.5]", 4)
    [(2, 'a cat'), (4, 'a dog')]
    >>> prompt_schedule("[(red:1.3):blue:0.5] car", 2)
    [(1, '(red:1.3) car'), (2, 'blue car')]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)\s*$")
MAX_DEPTH = 64  # deeper square-bracket nesting is treated as literal text


@dataclass
class _Edit:
    before: list
    after: list
    when: float


@dataclass
class _Alternate:
    options: list[list]


def _pairs(text: str) -> dict[int, int]:
    """Opening index -> closing index of every matched (, ) and [, ] pair outside escapes (one pass)."""
    match: dict[int, int] = {}
    stack: list[int] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch in "([":
            stack.append(i)
        elif ch in ")]":
            want = "(" if ch == ")" else "["
            # A1111's grammar: a closer matches the nearest opener of its kind; openers in between stay unmatched
            for k in range(len(stack) - 1, max(-1, len(stack) - 1 - MAX_DEPTH), -1):
                if text[stack[k]] == want:
                    match[stack[k]] = i
                    del stack[k:]
                    break
        i += 1
    return match


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.match = text, _pairs(text)

    def split_top(self, lo: int, hi: int, sep: str) -> list[tuple[int, int]]:
        """Spans of text[lo:hi] split on ``sep`` outside brackets and escapes."""
        spans, start, i = [], lo, lo
        while i < hi:
            ch = self.text[i]
            if ch == "\\":
                i += 2
                continue
            if ch in "([" and i in self.match and self.match[i] < hi:
                i = self.match[i] + 1
                continue
            if ch == sep:
                spans.append((start, i))
                start = i + 1
            i += 1
        return [*spans, (start, hi)]

    def parse(self, lo: int, hi: int, depth: int = 0) -> list:
        """text[lo:hi] as literal strings, _Edit and _Alternate nodes."""
        out: list = []
        i, literal = lo, lo
        while i < hi:
            ch = self.text[i]
            if ch == "\\":
                i += 2
                continue
            if ch == "[" and i in self.match and self.match[i] < hi and depth < MAX_DEPTH:
                node = self.bracket(i + 1, self.match[i], depth + 1)
                if node is not None:
                    out.append(self.text[literal:i])
                    out.append(node)
                    i = literal = self.match[i] + 1
                    continue
            i += 1
        out.append(self.text[literal:min(hi, len(self.text))])
        return out

    def bracket(self, lo: int, hi: int, depth: int) -> _Edit | _Alternate | None:
        options = self.split_top(lo, hi, "|")
        if len(options) > 1:
            return _Alternate([self.parse(a, b, depth) for a, b in options])
        parts = self.split_top(lo, hi, ":")
        if len(parts) in (2, 3) and _NUMBER.match(self.text[parts[-1][0]:parts[-1][1]]):
            when = float(self.text[parts[-1][0]:parts[-1][1]])
            before = self.parse(*parts[0], depth) if len(parts) == 3 else []
            return _Edit(before, self.parse(*parts[-2], depth), when)
        return None


def _render(nodes: list, step: int, steps: int) -> str:
    """The text at ``step``; an explicit stack instead of recursion, however deep the edits nest."""
    text: list[str] = []
    stack = [iter(nodes)]
    while stack:
        node = next(stack[-1], None)
        if node is None:
            stack.pop()
        elif isinstance(node, str):
            text.append(node)
        elif isinstance(node, _Edit):
            switch = node.when * steps if node.when < 1 else node.when
            stack.append(iter(node.after if step > int(switch) else node.before))
        else:
            stack.append(iter(node.options[(step - 1) % len(node.options)]))
    return "".join(text)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """[(last step, text used up to it), ...] covering steps 1..steps, consecutive duplicates merged."""
    nodes = _Parser(text).parse(0, len(text))
    if all(isinstance(node, str) for node in nodes):  # no editing: one text for every step
        return [(steps, text)]
    schedule: list[tuple[int, str]] = []
    for step in range(1, steps + 1):
        rendered = _render(nodes, step, steps)
        if schedule and schedule[-1][1] == rendered:
            schedule[-1] = (step, rendered)
        else:
            schedule.append((step, rendered))
    return schedule
