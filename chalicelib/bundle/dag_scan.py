"""A lexical scan for DAG definitions, so that most files need no AST.

Why it exists: validation runs where Airflow does not (the ingest function, the CLI before any
upload), and DAG ids are what the deploy diff, removal checks and the console show for every file
of every deploy. Parsing a whole module into an AST costs about as much as compiling it again
(together ~1.8x a plain `compile()`), while DAG definitions are a few hundred bytes of it. This
scanner finds every site the AST rules of `dag_ids.py` can match and parses only those
expressions; wherever it cannot delimit a site with certainty (non-ASCII code, other codecs,
`DAG` inside f-string fields, `case` clauses, ...) it returns None and the caller walks the whole
AST, so the ids are the same either way (property-tested against the AST walk). Airflow's own
loader (the parse check) gives exact ids of what a DAG file builds at run time, but it imports the
code, which the server never does with untrusted bundles.
"""
from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from typing import cast

from chalicelib.bundle.dag_ids import _CODING, _UTF8_NAMES, DYNAMIC, _callee, _dag_id_of_call

# A lexical scanner finds every site the AST rules above can match, so only those few
# expressions are parsed: compiling the bytes is the whole cost of most files. It works on
# UTF-8 text whose code (outside strings and comments) is ASCII, and gives up (None: use
# the whole AST) wherever a site cannot be delimited with certainty. A rule's site always
# shows the ASCII name "DAG" or "dag": identifiers are NFKC-normalised, and non-ASCII code
# makes the scanner give up. Every alternative of the patterns starts with a literal
# character, which lets the regex engine skip straight to the next candidate.
_NL = r"(?:\r\n|\r|\n)"
_STRING = (  # any string literal, from its opening quote (prefixes do not change where it ends)
    r"'''[^'\\]*(?:(?:\\[\s\S]|'(?!''))[^'\\]*)*'''"
    r'|"""[^"\\]*(?:(?:\\[\s\S]|"(?!""))[^"\\]*)*"""'
    rf"|'[^'\\\r\n]*(?:\\(?:{_NL}|.)[^'\\\r\n]*)*'"
    rf'|"[^"\\\r\n]*(?:\\(?:{_NL}|.)[^"\\\r\n]*)*"'
    r"""|'|\""""  # a quote that starts no literal: the scanner is lost
)
_SCAN = re.compile(
    rf"{_STRING}"
    r"|#[^\r\n]*"
    r"|DAG(?!\w)"
    r"|\n[ \t\f]*(?:@|case(?!\w))|\r[ \t\f]*(?:@|case(?!\w))"  # a decorator; a case clause (class patterns)
)
_TOKENS = re.compile(rf"{_STRING}|#[^\r\n]*|\\\r\n|\\\r|\\\n|\(|\[|\{{|\)|\]|\}}|\r\n|\r|\n")
_GAP = re.compile(rf"(?:[ \t\f]|\\{_NL})*")
_GAP_LINES = re.compile(rf"(?:[ \t\f]|\\{_NL}|#[^\r\n]*|{_NL}|\))*")
_BLANK_LINES = re.compile(rf"(?:{_NL}[ \t\f]*(?:#[^\r\n]*)?)+")
_DEF = re.compile(rf"(?:async(?:[ \t\f]|\\{_NL})+)?def(?:[ \t\f]|\\{_NL})+([A-Za-z_][A-Za-z0-9_]*)")
_CLASS = re.compile(r"class(?![A-Za-z0-9_])")
_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_PEP701 = sys.version_info >= (3, 12)  # f-strings are tokenized like code (nested quotes, comments)
_UNSURE = -2


def _scan_dag_ids(source: bytes) -> list[str] | None:
    """The DAG ids _dag_ids would find in the AST of source, or None when the scanner is unsure."""
    body = source[3:] if source.startswith(b"\xef\xbb\xbf") else source
    for line in body.split(b"\n", 2)[:2]:
        if b"coding" in line:  # ASCII bytes may even spell "DAG" in another codec (UTF-7)
            cookie = _CODING.match(line)
            if cookie is None or cookie.group(1).lower() not in _UTF8_NAMES or line.count(b"coding") > 1:
                return None
    ascii_only = body.isascii()
    if ascii_only and b"DAG" not in body and b"dag" not in body:
        return []
    try:
        text = "\n" + body.decode("utf-8")  # every line, the first included, follows a line break
    except UnicodeDecodeError:
        return None
    # Every site shows "DAG" or "dag" in ASCII code: no need to look past the last one.
    last = len(text) if not ascii_only else max(text.rfind("DAG"), text.rfind("dag"))
    calls: list[tuple[int, int]] = []  # (start of "DAG", its opening parenthesis)
    decorators: list[int] = []  # positions of "@" starting a line
    code = 0  # start of the code after the last string or comment
    for m in _SCAN.finditer(text):
        start = m.start()
        if start > last:
            break
        c = text[start]
        if c in "'\"#":
            if not ascii_only and not text[code:start].isascii():
                return None
            code = m.end()
            if c == "#":
                continue
            if code - start == 1:
                return None
            before = text[start - 1]  # f-strings, also after "if" or "not": harmless
            if before in "fFtT" or (before in "rR" and text[start - 2] in "fFtT"):
                literal = text[start:code]  # its replacement fields are code (calls, never decorators)
                if _PEP701 or "DAG" in literal or not literal.isascii():
                    fields = _fstring_fields(literal)
                    if fields is None or any("DAG" in f or not f.isascii() for f in fields):
                        return None
        elif c == "D":
            if text[start - 1] in _WORD or not text[start - 1].isascii():
                continue  # the end of a longer name
            paren = _call_paren(text, start)
            if paren == _UNSURE:
                return None
            if paren >= 0:
                calls.append((start, paren))
        elif m.group().endswith("@"):
            brk = start - 1 if text.startswith("\r\n", start - 1) else start
            if brk > 0 and text[brk - 1] == "\\":
                return None  # the line may continue the one before (or end a comment in a backslash)
            decorators.append(m.end() - 1)
        else:
            return None
    if not ascii_only and not text[code:].isascii():
        return None
    found: set[str] = set()
    dynamic = 0
    covered = 0
    for start, paren in calls:
        if start < covered:
            continue  # nested in a DAG call already parsed
        end = _bracket_end(text, paren)
        node = _parse_expression("DAG" + text[paren:end]) if end > 0 else None
        if node is None:
            return None
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call) and _callee(sub.func) == "DAG":
                given, dag_id = _dag_id_of_call(sub)
                if dag_id is not None:
                    found.add(dag_id)
                elif given:
                    dynamic += 1
        covered = end
    for at in decorators:
        ok, dag_id = _decorator_dag_id(text, at)
        if not ok:
            return None
        if dag_id == DYNAMIC:
            dynamic += 1
        elif dag_id is not None:
            found.add(dag_id)
    return sorted(found) + [DYNAMIC] * dynamic


def _fstring_fields(literal: str) -> list[str] | None:
    """The replacement fields of an f-string (from its opening quote), or None when unsure.

    Sure only of fields without quotes, comments, backslashes, "{{" or "}}": those end where
    the literal text says under every Python since 3.6, including PEP 701's (3.12), which
    tokenizes fields like code.
    """
    width = 3 if len(literal) >= 6 and literal[0] * 3 == literal[:3] else 1
    body = literal[width:-width]
    fields: list[str] = []
    depth = 0
    opened = 0
    i = 0
    while i < len(body):
        c = body[i]
        pair = body[i : i + 2]
        if depth == 0:
            if c == "\\":
                if pair[1:] in ("{", "}", "N"):
                    return None
                i += 1
            elif pair in ("{{", "}}"):
                i += 1
            elif c == "{":
                depth, opened = 1, i
            elif c == "}":
                return None
        elif c in "'\"#\\\r\n" or pair in ("{{", "}}"):
            return None
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                fields.append(body[opened + 1 : i])
        i += 1
    return fields if depth == 0 else None


def _call_paren(text: str, start: int) -> int:
    """For the name "DAG" at start: the position of the "(" calling it, -1 if none, _UNSURE."""
    end = start + 3
    after = _GAP.match(text, end).end()  # type: ignore[union-attr]  # always matches
    if text.startswith("(", after):
        j = start
        while text[j - 1] in " \t\f":
            j -= 1
        if text[j - 1] in "\r\n":
            brk = j - 2 if text.startswith("\r\n", j - 2) else j - 1
            return _UNSURE if brk > 0 and text[brk - 1] == "\\" else after
        for word in ("def", "class"):  # "def DAG(": a definition, not a call
            k = j - len(word)
            if k >= 1 and text.startswith(word, k) and text[k - 1] not in _WORD:
                return -1
        return after
    # "DAG" then a comment or line break (inside brackets), or "(DAG)(...)": leave it to the AST.
    beyond = _GAP_LINES.match(text, end).end()  # type: ignore[union-attr]
    return _UNSURE if text.startswith("(", beyond) else -1


def _bracket_walk(text: str, pos: int) -> Iterator[tuple[re.Match[str], str, int]]:
    """Tokens from pos with the bracket depth after each; stops (unsure) at an unterminated quote."""
    depth = 0
    for m in _TOKENS.finditer(text, pos):
        c = text[m.start()]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c in "'\"" and m.end() - m.start() == 1:
            return
        yield m, c, depth


def _bracket_end(text: str, pos: int) -> int:
    """The position after the bracket matching the one at pos; -1 when not found."""
    for m, c, depth in _bracket_walk(text, pos):
        if c in ")]}" and depth == 0:
            return m.end()
    return -1


def _line_end(text: str, pos: int) -> int:
    """The position of the line break ending the logical line that goes on at pos; -1 if unsure."""
    for m, c, depth in _bracket_walk(text, pos):
        if depth < 0:
            return -1  # pos was inside brackets: not a decorator
        if c in "\r\n" and depth == 0:
            return m.start()
    return -1


def _decorator_dag_id(text: str, at: int) -> tuple[bool, str | None]:
    """(sure?, DAG id) for the decorator whose "@" is at `at` (or an "@" operator starting a line);
    the id is DYNAMIC for a @dag(...) whose id is computed."""
    end = _line_end(text, at + 1)
    if end < 0:
        return False, None
    expression = text[at + 1 : end]
    if "dag" not in expression:
        return True, None
    node = _parse_expression("(" + expression + "\n)")
    if node is None:
        return False, None
    given, dag_id = False, None
    if _callee(node) != "dag":
        if not (isinstance(node, ast.Call) and _callee(node.func) == "dag"):
            return True, None
        given, dag_id = _dag_id_of_call(node)
    name = _decorated_name(text, end)
    if name is None:
        return False, None
    if not name:
        return True, None  # a class: only functions make DAGs
    if given and dag_id is None:
        return True, DYNAMIC
    return True, dag_id if given else name


def _decorated_name(text: str, pos: int) -> str | None:
    """Name of the function that the decorators ending at pos decorate; "" for a class; None if unsure."""
    while True:
        m = _BLANK_LINES.match(text, pos)
        if m is None:
            return None
        pos = m.end()
        if text.startswith("@", pos):
            pos = _line_end(text, pos + 1)
            if pos < 0:
                return None
            continue
        if (d := _DEF.match(text, pos)) is not None:
            return d.group(1)
        return "" if _CLASS.match(text, pos) else None


def _parse_expression(code: str) -> ast.expr | None:
    try:
        return cast(ast.Expression, compile(code, "<dag>", "eval", ast.PyCF_ONLY_AST, dont_inherit=True)).body
    except Exception:  # noqa: BLE001 - any failure only means the scanner is unsure
        return None

