"""DAG ids as the AST shows them: `DAG(...)` calls and `@dag`-decorated functions with literal ids.

The rules that both ways of finding DAG ids apply (`dag_scan.py` on the few sites it locates, and
the whole-module AST walk here when it cannot): an id given as a string literal is named; an id
computed at parse time (`DAG(f"etl_{team}")` in a loop) is counted as one `DYNAMIC` definition.
"""
from __future__ import annotations

import ast
import bisect
import re

_DAG_LINE = re.compile(rb"[dD][aA][gG]|[\x80-\xff]+")
_CODING = re.compile(rb"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)")
_UTF8_NAMES = (b"utf-8", b"utf8", b"utf_8", b"utf-8-sig")



def _const_str(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _callee(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _dag_id_of_call(call: ast.Call) -> tuple[bool, str | None]:
    """(explicit id given?, literal id or None) from positional arg 0 or dag_id=; a call with *args
    or **kwargs that may hold the id counts as given, with no literal."""
    if call.args and not isinstance(call.args[0], ast.Starred):
        return True, _const_str(call.args[0])
    for kw in call.keywords:
        if kw.arg == "dag_id":
            return True, _const_str(kw.value)
    if any(isinstance(a, ast.Starred) for a in call.args) or any(kw.arg is None for kw in call.keywords):
        return True, None
    return False, None


# In the DAG id lists of the checker, its workers and the compile cache, one of these stands for each
# DAG definition whose id is computed at parse time (no real DAG id can be a NUL); FileEntry counts them.
DYNAMIC = "\x00"


def split_dynamic(raw: list[str]) -> tuple[list[str], int]:
    """(literal DAG ids, number of definitions with computed ids) of a checker's DAG id list."""
    dynamic = raw.count(DYNAMIC)
    return (raw if not dynamic else [d for d in raw if d != DYNAMIC]), dynamic


def _dag_lines(source: bytes) -> list[int] | None:
    """Sorted numbers of the lines that can hold a DAG definition; None when unknown (odd codecs)."""
    head = source.split(b"\n", 2)[:2]
    cookie = next((m.group(1).lower() for h in head if (m := _CODING.match(h))), None)
    if cookie is not None and cookie not in _UTF8_NAMES:
        return None  # line splitting of the raw bytes may not match the decoded source
    if b"\r" in source or not source.isascii():
        return [i for i, text in enumerate(source.splitlines(), 1) if _DAG_LINE.search(text)]
    lower = source.lower()
    lines: list[int] = []
    line, last = 1, 0
    pos = lower.find(b"dag")
    while pos >= 0:
        line += lower.count(b"\n", last, pos)
        last = pos
        if not lines or lines[-1] != line:
            lines.append(line)
        pos = lower.find(b"dag", pos + 3)
    return lines


def _dag_ids(tree: ast.AST, source: bytes) -> list[str]:
    """DAG ids defined with string literals: DAG(...) calls and @dag-decorated functions.

    Only nodes whose lines mention "dag" (any case) or hold non-ASCII text (identifiers
    are NFKC-normalised) are visited, which skips most of a typical file.
    """
    lines = _dag_lines(source)
    if lines is not None and not lines:
        return []
    found: set[str] = set()
    dynamic = 0
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Call):
            if _callee(node.func) == "DAG":
                given, dag_id = _dag_id_of_call(node)
                if dag_id is not None:
                    found.add(dag_id)
                elif given:
                    dynamic += 1
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                if _callee(dec) == "dag":
                    found.add(node.name)
                elif isinstance(dec, ast.Call) and _callee(dec.func) == "dag":
                    given, dag_id = _dag_id_of_call(dec)
                    if not given:
                        found.add(node.name)
                    elif dag_id is not None:
                        found.add(dag_id)
                    else:
                        dynamic += 1
        for name in node._fields:
            value = getattr(node, name, None)
            for child in value if isinstance(value, list) else (value,):
                if not isinstance(child, ast.AST):
                    continue
                if lines is not None:
                    end = getattr(child, "end_lineno", None)
                    if end is not None:
                        start = child.lineno  # type: ignore[attr-defined]
                        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                            start = min([start, *(d.lineno for d in child.decorator_list)])
                        i = bisect.bisect_left(lines, start)
                        if i == len(lines) or lines[i] > end:
                            continue
                stack.append(child)
    return sorted(found) + [DYNAMIC] * dynamic


