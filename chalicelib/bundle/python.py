"""The Python check: every `.py` file compiles exactly as Python imports it, and the DAG ids it defines.

`_check_python` compiles the bytes (never runs them) and turns every failure into an issue naming
the file and line; DAG ids come from the lexical scan when it is sure, else from the AST.
Compiling hostile code can take unbounded memory and CPU: large files are compiled in bounded
worker processes (`compile_workers.py`), which call this same function.
"""
from __future__ import annotations

import ast
import gc
import warnings

from chalicelib.bundle.dag_ids import _dag_ids
from chalicelib.bundle.dag_scan import _scan_dag_ids
from chalicelib.bundle.report import Issue


def _check_python(source: bytes, path: str) -> tuple[Issue | None, list[str]]:
    """Compile source exactly as Python imports it; return an issue or the DAG ids it defines."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(source, path, "exec", dont_inherit=True)
            dag_ids = _find_dag_ids(source, path)
    except SyntaxError as exc:
        line = exc.lineno if isinstance(exc.lineno, int) and exc.lineno > 0 else None
        where = f", line {line}" if line else ""
        message = f"{path}{where}: {type(exc).__name__}: {exc.msg}"
        return Issue(code="syntax_error", path=path, line=line, message=message), []
    except RecursionError:
        return _python_error(path, "the code is nested too deeply to compile"), []
    except MemoryError:
        return Issue(code="python_too_complex", path=path,
                     message=f"{path}: too complex to compile: it needs more memory than allowed"), []
    except Exception as exc:  # noqa: BLE001 - ValueError (NUL bytes), LookupError (unknown codec), ...
        return _python_error(path, f"{type(exc).__name__}: {exc}"), []
    return None, dag_ids


def _python_error(path: str, why: str) -> Issue:
    return Issue(code="python_error", path=path, message=f"{path}: cannot be compiled: {why}")


def _find_dag_ids(source: bytes, path: str) -> list[str]:
    """DAG ids defined in source, which compiles: from the DAG(...) calls and @dag decorators alone
    when the scanner can locate them with certainty, else from the whole module's AST."""
    found = _scan_dag_ids(source)
    if found is not None:
        return found
    # The AST is acyclic and dies here: keeping the cyclic GC off until it is freed avoids
    # GC passes over thousands of fresh nodes (this roughly halves the cost of the parse).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _dag_ids(compile(source, path, "exec", ast.PyCF_ONLY_AST, dont_inherit=True), source)
    finally:
        if gc_was_enabled:
            gc.enable()

