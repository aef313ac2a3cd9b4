"""DAG ids are found by a lexical scan plus small parses, exactly as a walk of the whole AST finds them.

The whole-module AST walk (``_dag_ids``) is the reference: every case is checked against it,
and the scan must either agree with it or say it is unsure (and the validator then walks the AST).
"""

from __future__ import annotations

import ast
import gzip
import io
import tarfile
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chalicelib.bundle import FileEntry, Issue, dag_ids, dag_scan, python, validate_stream


def entry_in_bundle(source: bytes) -> FileEntry:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("dags/d.py")
        info.size = len(source)
        tf.addfile(info, io.BytesIO(source))
    report = validate_stream(io.BytesIO(gzip.compress(buf.getvalue(), mtime=0)))
    assert report.valid, report.errors
    return report.manifest[0]


def ids_in_bundle(source: bytes) -> list[str]:
    return entry_in_bundle(source).dag_ids


def reference_raw(source: bytes) -> list[str]:
    """The whole-AST walk's answer: literal ids, then one DYNAMIC per definition with a computed id."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = compile(source, "d.py", "exec", ast.PyCF_ONLY_AST, dont_inherit=True)
    return dag_ids._dag_ids(tree, source)


def reference_ids(source: bytes) -> list[str]:
    return dag_ids.split_dynamic(reference_raw(source))[0]


def compiles(source: bytes) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(source, "d.py", "exec", dont_inherit=True)
    except Exception:  # noqa: BLE001 - any failure: not a candidate source
        return False
    return True


FAST, UNSURE = True, False  # whether the scan decides on its own, or leaves the file to the AST walk

CASES: dict[str, tuple[str | bytes, list[str], bool]] = {
    # strings and comments that mention DAG are not code
    "string": ('x = "DAG(\'no\')"\nDAG("yes")\n', ["yes"], FAST),
    "docstring": ('"""\nDAG("no")\n@dag\ndef f():\n    pass\n"""\nDAG("yes")\n', ["yes"], FAST),
    "single-quoted-triple": ("s = '''it's \"DAG('no')\" '''\nDAG('yes')\n", ["yes"], FAST),
    "escaped-quote": ('s = "a \\" DAG(\\"no\\")"\nDAG("yes")\n', ["yes"], FAST),
    "continued-string": ('s = "a\\\nDAG(\'no\')"\nDAG("yes")\n', ["yes"], FAST),
    "bytes": ('b = b"DAG(\'no\')"\nDAG("yes")\n', ["yes"], FAST),
    "raw-string": ('s = r"\\"DAG(\'no\')"\nDAG("yes")\n', ["yes"], FAST),
    "comment": ('# DAG("no")\nDAG("yes")  # DAG("no2")\n', ["yes"], FAST),
    "comment-with-quote": ("# it's DAG('no')\nDAG('yes')\n", ["yes"], FAST),
    "string-argument-with-parens": ('DAG("a(b", description=")(")\n', ["a(b"], FAST),
    # calls
    "multi-line": ('DAG(\n    # a ( comment\n    "ml",\n    schedule=None,\n)\n', ["ml"], FAST),
    "keyword-later": ('DAG(\n    schedule=None,\n    dag_id="kw_later",\n)\n', ["kw_later"], FAST),
    "space-before-paren": ('DAG ("sp")\n', ["sp"], FAST),
    "continuation-before-paren": ('DAG \\\n("cont")\n', ["cont"], FAST),
    "assigned-after-continuation": ('d = \\\n    DAG("c")\n', ["c"], UNSURE),
    "paren-on-next-line": ('x = [DAG\n("nl")]\n', ["nl"], UNSURE),
    "name-then-new-statement": ('import DAG\n("not_an_argument")\n', [], UNSURE),
    "parenthesised-callee": ('(DAG)("paren")\n', ["paren"], UNSURE),
    "call-of-call": ('f(DAG)("no")\n', [], UNSURE),
    "tuple-callee": ('(x, DAG)("no")\n', [], UNSURE),
    "isinstance": ("if isinstance(d, DAG):\n    pass\nDAG('yes')\n", ["yes"], FAST),
    "def-named-DAG": ('def DAG(dag_id="no"):\n    pass\n', [], FAST),
    "class-named-DAG": ("class DAG(dict, metaclass=type):\n    pass\n", [], FAST),
    "async-def-named-DAG": ('async def DAG(dag_id="no"):\n    pass\n', [], FAST),
    "longer-names": ('MyDAG("no")\nDAGger("no")\nmy_DAG("no")\nDAG2("no")\n', [], FAST),
    "module-alias": ('from airflow import models\nmodels.DAG(dag_id="m")\n', ["m"], FAST),
    "attribute-chain": ('import airflow\nairflow.models.dag.DAG("chain")\n', ["chain"], FAST),
    "positional-wins": ('DAG("pos", dag_id="kw")\n', ["pos"], FAST),
    "starred-then-keyword": ('DAG(*args, dag_id="kw")\n', ["kw"], FAST),
    "kwargs-only": ("DAG(**kw)\n", [], FAST),
    "no-arguments": ("DAG()\n", [], FAST),
    "implicit-concatenation": ('DAG("a" "b")\n', ["ab"], FAST),
    "escapes": ('DAG("t\\u00e9st\\n")\n', ["t\u00e9st\n"], FAST),
    "f-string-id": ('DAG(f"x")\n', [], FAST),
    "f-string-field": ("x = f\"{DAG('inner')}\"\n", ["inner"], UNSURE),
    "f-string-elsewhere": ('n = 1\nmsg = f"{n} rows"\nDAG("yes")\n', ["yes"], FAST),
    "f-string-text-mentions-DAG": ('n = 1\nmsg = f"DAG(\'no\') ran {n} times \u2014 ok"\nDAG("yes")\n', ["yes"], FAST),
    "f-string-field-non-ascii": ('\uff24\uff21\uff27 = str\nmsg = f"{\uff24\uff21\uff27(1)}"\n', [], UNSURE),
    "nested": ('DAG("outer", default_args={"d": DAG("inner")})\n', ["inner", "outer"], FAST),
    "in-lambda": ('make = lambda: DAG("lam")\n', ["lam"], FAST),
    "annotation": ('x: DAG("ann") = 1\n', ["ann"], FAST),
    "dead-code": ('if False:\n    DAG("dead")\n', ["dead"], FAST),
    "DAG-decorator": ('@DAG("as_decorator")\ndef f():\n    pass\n', ["as_decorator"], FAST),
    "case-pattern": ('match x:\n    case DAG("pattern"):\n        pass\n', [], UNSURE),
    "call-in-match-subject": ('match DAG("subject"):\n    case _:\n        pass\n', ["subject"], FAST),
    # @dag decorators
    "decorator-positional": ('@dag("pos_dec")\ndef f():\n    pass\n', ["pos_dec"], FAST),
    "decorator-dynamic": ("@dag(dag_id=NAME)\ndef f():\n    pass\n", [], FAST),
    "decorator-f-string": ('@dag(dag_id=f"x{1}")\ndef f():\n    pass\n', [], FAST),
    "decorator-starred": ("@dag(*a)\ndef from_name():\n    pass\n", [], FAST),  # *a may hold the id
    "decorator-comment": ("@dag  # a comment (\ndef commented():\n    pass\n", ["commented"], FAST),
    "decorator-multi-line": (
        '@dag(\n    schedule=None,\n    tags=["a)"],\n)\ndef multi():\n    pass\n',
        ["multi"],
        FAST,
    ),
    "decorator-stacked": (
        "@dag\n# a comment\n\n@other(x,\n      y)\nasync def stacked():\n    pass\n",
        ["stacked"],
        FAST,
    ),
    "decorator-parenthesised": ("@(dag)\ndef par():\n    pass\n", ["par"], FAST),
    "decorator-def-continued": ("@dag\ndef \\\n  cont():\n    pass\n", ["cont"], FAST),
    "decorator-indented": ("class C:\n    @dag()\n    def method(self):\n        pass\n", ["method"], FAST),
    "decorator-on-class": ('@dag\nclass C:\n    pass\n@dag(dag_id="c")\nclass D:\n    pass\n', [], FAST),
    "decorator-other": ("@task\ndef not_a_dag():\n    pass\n", [], FAST),
    "decorator-dag-attribute": ("@dag.task\ndef not_a_dag():\n    pass\n", [], FAST),
    "decorator-dag-call-call": ("@dag()()\ndef not_a_dag():\n    pass\n", [], FAST),
    "dag-call-not-decorator": ('dag(dag_id="no")\nwith DAG("yes") as dag:\n    pass\n', ["yes"], FAST),
    "matmul-line-in-brackets": ("x = (a\n@ dag)\n", [], UNSURE),
    "matmul-line-in-list": ("x = [a\n @ dag,\n b]\n", [], FAST),
    "matmul-after-continuation": ("x = a \\\n@ dag\ndef f():\n    pass\n", [], UNSURE),
    # encodings and line endings
    "crlf": (b'from airflow import DAG\r\nDAG(\r\n  "crlf",\r\n)\r\n@dag\r\ndef f():\r\n    pass\r\n', ["crlf", "f"], FAST),
    "cr": (b'DAG(\r  "cr"\r)\r@dag\rdef g():\r    pass\r', ["cr", "g"], FAST),
    "triple-quoted-crlf-id": (b'DAG("""a\r\nb""")\r\n', ["a\nb"], FAST),
    "bom": (b'\xef\xbb\xbfDAG("bom")\n', ["bom"], FAST),
    "utf8-cookie": (b'# -*- coding: utf-8 -*-\nDAG("caf\xc3\xa9")\n', ["caf\u00e9"], FAST),
    "utf7-cookie": (b"# coding: utf-7\nx = 1\n+AEQAQQBH-('seven')\n", ["seven"], UNSURE),
    "non-ascii-in-strings": ('# caf\u00e9\nDAG("caf\u00e9")\n', ["caf\u00e9"], FAST),
    "non-ascii-code": ('\u00e9 = 1\nDAG("x")\n', ["x"], UNSURE),
    "fullwidth-after-ascii": ('DAG("a")\n\uff24\uff21\uff27("b")\n', ["a", "b"], UNSURE),
}


# DAG definitions whose ids are computed: counted, never named
COMPUTED = {"kwargs-only": 1, "f-string-id": 1, "f-string-field-non-ascii": 1, "decorator-dynamic": 1,
            "decorator-f-string": 1, "decorator-starred": 1}


@pytest.mark.parametrize("case", list(CASES))
def test_dag_ids_match_a_walk_of_the_whole_ast(case: str) -> None:
    source, expected, fast = CASES[case]
    data = source.encode() if isinstance(source, str) else source
    entry = entry_in_bundle(data)
    assert entry.dag_ids == expected
    assert entry.dynamic_dags == COMPUTED.get(case, 0)
    assert reference_ids(data) == expected
    scanned = dag_scan._scan_dag_ids(data)
    assert (scanned is not None) == fast
    if scanned is not None:
        assert scanned == reference_raw(data), "the scan counts computed ids as the AST walk does"


def test_dags_built_in_a_loop_are_counted_as_computed_and_named_nowhere() -> None:
    source = (b"from airflow import DAG\n\nfor team in ('sales', 'ops', 'hr'):\n"
              b"    with DAG(f'report_{team}', schedule=None):\n        pass\n\nDAG('fixed')\n")
    entry = entry_in_bundle(source)
    assert (entry.dag_ids, entry.dynamic_dags) == (["fixed"], 1), "one site in the source, however many DAGs it makes"


def test_typical_dag_files_are_decided_without_the_whole_ast() -> None:
    typical = (
        b'"""Nightly load."""\nfrom airflow import DAG\nfrom airflow.decorators import dag, task\n\n'
        b'@dag(schedule="@daily", tags=["etl"])\ndef taskflow():\n    @task\n    def extract() -> dict[str, int]:\n'
        b'        return {"rows": 1}\n    extract()\n\ntaskflow()\n\n'
        b'with DAG(\n    dag_id="classic",\n    default_args={"owner": "me"},\n) as dag:\n'
        b'    print(f"{dag} loaded")  # DAG("comment")\n'
    )
    assert dag_scan._scan_dag_ids(typical) == ["classic", "taskflow"] == reference_ids(typical)


SNIPPETS = [
    "from airflow import DAG",
    "import airflow",
    'DAG("a")',
    'DAG(dag_id="b", schedule=None)',
    "DAG(\n    'c',\n    # (\n)",
    "d = models.DAG(dag_id='d')",
    "with DAG('e') as dag:\n    pass",
    "@dag\ndef f():\n    pass",
    "@dag(dag_id='g')\ndef h():\n    pass",
    "@dag(schedule=None)\nasync def i():\n    pass",
    "@other\n@dag()\ndef j():\n    pass",
    "@dag\nclass K:\n    pass",
    "x = 'DAG(\"no\")'",
    '"""\n@dag\ndef doc():\n    pass\n"""',
    "# DAG('comment')",
    "y = f'{z}'",
    "w = f\"{DAG('fs')}\"",
    "(DAG)('pa')",
    "q = [DAG\n('nl')]",
    "r = (a\n@ dag)",
    "s = \\\n    DAG('cont')",
    "DAG(*a, dag_id='st')",
    "DAG(name)",
    "def DAG(dag_id='no'):\n    pass",
    "t = DAG('o', default_args={'x': DAG('in')})",
    "u = lambda: DAG('lam')",
    "v = b'DAG(\"b\")'",
    "if isinstance(v, DAG):\n    pass",
    "match v:\n    case DAG('pat'):\n        pass",
]


@given(
    parts=st.lists(st.sampled_from(SNIPPETS), max_size=6),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    prefix=st.sampled_from(["", "\ufeff", "# -*- coding: utf-8 -*-\n", "# coding: latin-1\n", "\u00e9 = 1\n"]),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_scan_agrees_with_the_whole_ast_on_combined_snippets(parts: list[str], newline: str, prefix: str) -> None:
    text = prefix + "\n".join(parts) + "\n"
    data = text.replace("\n", newline).encode("latin-1" if "latin-1" in prefix else "utf-8")
    if not compiles(data):
        return
    scanned = dag_scan._scan_dag_ids(data)
    expected = reference_raw(data)
    assert scanned is None or scanned == expected
    assert python._find_dag_ids(data, "d.py") == expected


CALLEES = ["DAG", "DAG", "models.DAG", "(DAG)", "dag", "f(DAG)", "DAGx", "x.DAG", "DAG.x"]
GAPS = ["", "", " ", " \\\n", "\n", "  # c (\n"]
ARGS = ['"a"', "'b'", 'dag_id="c"', "dag_id='d' 'e'", "*s", "**k", 'f"x{y}"', '"""m\nl"""', "name", "\n'f'", "# (\n'g'"]
ARGS += ['DAG("n")', '"DAG(\\"s\\")"', 'r"\\q"', "lambda: DAG('l')", "h(\n)", "[1, (2,\n 3)]", "\"it's\""]
DECORATORS = ["dag", "dag()", 'dag("p")', 'dag(dag_id="k")', "dag(*a)", "dag(schedule=None,\n  tags=['x)'])"]
DECORATORS += ["x.dag", "(dag)", "task", "task()", "dag.task", "dag()()", 'DAG("dd")', "dag  # c"]
FUNCTIONS = ["def fn():\n    pass", "async def afn():\n    pass", "class K:\n    pass", "def \\\n  cont():\n    pass"]


@st.composite
def statements(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["call", "call", "decorated", "assign"]))
    if kind == "decorated":
        decorators = draw(st.lists(st.sampled_from(DECORATORS), min_size=1, max_size=3))
        between = draw(st.sampled_from(["\n", "\n", "\n# c\n", "\n\n"]))
        return "".join("@" + d + between for d in decorators) + draw(st.sampled_from(FUNCTIONS))
    args = ", ".join(draw(st.lists(st.sampled_from(ARGS), max_size=3)))
    call = draw(st.sampled_from(CALLEES)) + draw(st.sampled_from(GAPS)) + "(" + args + ")"
    return call if kind == "call" else "v = " + call


@st.composite
def modules(draw: st.DrawFn) -> str:
    lines = []
    for statement in draw(st.lists(statements(), min_size=1, max_size=4)):
        wrap = draw(st.sampled_from(["", "", "", "list", "if", "string", "comment", "fstring", "continued"]))
        if wrap == "list":
            statement = "w = [\n" + statement.replace("v = ", "") + ",\n]"
        elif wrap == "if":
            statement = "if True:\n" + "\n".join("    " + line for line in statement.split("\n"))
        elif wrap == "string":
            statement = "s = '''" + statement.replace("'''", "") + "'''"
        elif wrap == "comment":
            statement = "\n".join("# " + line for line in statement.split("\n"))
        elif wrap == "fstring":
            statement = 'fs = f"{' + statement.split("\n")[0].replace('"', "'") + '}"'
        elif wrap == "continued":
            statement = "c = 1 + \\\n" + statement.split("\n")[0].replace("v = ", "")
        lines.append(statement)
    return "\n".join(lines) + "\n"


@given(modules(), st.sampled_from(["\n", "\r\n"]))
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_scan_agrees_with_the_whole_ast_on_generated_modules(text: str, newline: str) -> None:
    data = text.replace("\n", newline).encode()
    if not compiles(data):
        return
    scanned = dag_scan._scan_dag_ids(data)
    assert scanned is None or scanned == reference_raw(data)


# --------------------------------------------------------------------------- compile errors


def ast_round_trip_issue(source: bytes, path: str) -> Issue | None:
    """How compile errors were reported when each file was parsed to an AST and that was compiled."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = compile(source, path, "exec", ast.PyCF_ONLY_AST, dont_inherit=True)
            compile(tree, path, "exec", dont_inherit=True)
    except SyntaxError as exc:
        line = exc.lineno if isinstance(exc.lineno, int) and exc.lineno > 0 else None
        where = f", line {line}" if line else ""
        message = f"{path}{where}: {type(exc).__name__}: {exc.msg}"
        return Issue(code="syntax_error", path=path, line=line, message=message)
    except Exception as exc:  # noqa: BLE001 - the other kinds are compared by code only
        return Issue(code="python_error", path=path, message=type(exc).__name__)
    return None


BROKEN = [
    b"def f(:\n    pass\n",
    b"x = 1\n  y = 2\n",
    b"def f():\nreturn 1\n",
    b"x = 1\nreturn x\n",
    b"def f():\n    nonlocal q\n",
    b"def f():\n    x = 1\n    global x\n",
    b"x = 1\x00\n",
    b"# coding: no-such-codec\nx = 1\n",
    b"x = '\xff'\n",
    b"\xef\xbb\xbf# coding: latin-1\nx = 1\n",
    b'DAG("a"\n',
    b"with DAG('x') as dag:\npass\n",
    b"@dag\nx = 1\n",
    b"f(a=1, b)\n",
    b"f(x for x in y, 1)\n",
    b"f(a=1, a=2)\n",
    b"async def f():\n    yield from x\n",
    b"def f():\n    await x\n",
    b"class C:\n    break\n",
    b"x = (1,\n     2\n",
    b"s = '''never closed\n",
    b"x = 1 +\n",
    b"del f()\n",
    b"f'{'\n",
    b"lambda: (yield)\nx = [i for i in range(3)\n",
    b"x = 0777\n",
    b"\tif x:\n        pass\n",
    b"x = 1\r\ny = (\r\n",
    b"DAG('ok')\n" * 50 + b"def (\n",
]


@pytest.mark.parametrize("source", BROKEN)
def test_compile_errors_are_reported_as_before(source: bytes) -> None:
    issue, dag_ids = python._check_python(source, "dags/broken.py")
    expected = ast_round_trip_issue(source, "dags/broken.py")
    assert issue is not None and expected is not None and dag_ids == []
    if expected.code == "syntax_error":
        assert issue == expected
    else:
        assert issue.code == "python_error"


# --------------------------------------------------------------------------- f-strings


@pytest.mark.parametrize(
    ("literal", "fields"),
    [
        ('"plain"', []),
        ('"{x} and {y!r:>10}"', ["x", "y!r:>10"]),
        ('"{{literal}} {x}"', ["x"]),
        ('"""multi\nline {x}"""', ["x"]),
        ('"a \\n {x}"', ["x"]),
        ("'it\"s {x}'", ["x"]),
        ('"{ {1: 2}[1] }"', [" {1: 2}[1] "]),
        ("'{x!r}'", ["x!r"]),
        ('"This DAG ran {n} times \u2014 {DAG(1)}"', ["n", "DAG(1)"]),
        ('"{d["k"]}"', None),  # Python 3.12 reads this as one f-string, older ones as two strings
        ('"{x:{width}}"', None),
        ('"{x}}}"', None),
        ('"\\{x}"', None),
        ('"\\N{DASH} {x}"', None),
        ('"{x # comment\n}"', None),
        ('"{"', None),
        ('"}"', None),
    ],
)
def test_fstring_fields_are_split_only_when_every_python_splits_them_alike(
    literal: str, fields: list[str] | None
) -> None:
    assert dag_scan._fstring_fields(literal) == fields
