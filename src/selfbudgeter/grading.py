"""Answer extraction and grading: the one owner of "what is the final answer" and "is it right".

Extraction order: the last `\\boxed{...}` (nested braces), then GSM8K's `#### n`, then "the answer is ...".
"""

from __future__ import annotations

import re

_BOXED = ("\\boxed{", "\\fbox{")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.\s*)?$", re.IGNORECASE | re.MULTILINE)


def _last_boxed(text: str) -> str | None:
    start = max(text.rfind(tag) for tag in _BOXED)
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # unbalanced: no answer rather than a truncated one


def extract_answer(text: str) -> str | None:
    """The final answer of a solution, or None when there is none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    said = _ANSWER_IS.findall(text)
    if said:
        return said[-1].strip().rstrip(".")
    return None
