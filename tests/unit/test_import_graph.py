"""Which files an incremental parse parses again: the importers of what changed, found from the
import graph (no Airflow needed)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dagcast.parse import importers_of, module_of


def reference(graph: dict[str, list[str]], touched: set[str]) -> set[str]:
    """The definition, spelled out: a file is an importer when one of its imports is, or is under, a
    touched module or the module of an importer (importing `a.b.c` runs `a` and `a.b`)."""
    modules = {m for m in map(module_of, touched) if m}
    found: set[str] = set()
    while True:
        more = {rel for rel, names in graph.items() if rel not in found
                and any(n == m or n.startswith(m + ".") for n in names for m in modules)}
        if not more:
            return found
        found |= more
        modules |= {m for m in map(module_of, more) if m}


PARTS = st.sampled_from(["a", "b", "c", "common", "utils", "team_0"])
NAMES = st.lists(PARTS, min_size=1, max_size=3).map(".".join)
FILES = st.one_of(NAMES.map(lambda n: n.replace(".", "/") + ".py"),
                  NAMES.map(lambda n: n.replace(".", "/") + "/__init__.py"))


@settings(max_examples=300, deadline=None)
@given(graph=st.dictionaries(FILES, st.lists(NAMES, max_size=4), max_size=12), touched=st.sets(FILES, max_size=3))
def test_importers_are_exactly_the_files_that_reach_a_touched_module(graph: dict[str, list[str]],
                                                                     touched: set[str]) -> None:
    assert importers_of(graph, touched) == reference(graph, touched)


def test_a_package_import_reaches_its_submodules_importers_but_not_a_lookalike_name() -> None:
    graph = {"dags/one.py": ["common.utils"], "dags/two.py": ["common"], "dags/three.py": ["commonplace"],
             "common/utils.py": ["common.base"], "dags/four.py": ["team_0.x"]}
    assert importers_of(graph, {"common/base.py"}) == {"common/utils.py", "dags/one.py"}
    assert importers_of(graph, {"common/__init__.py"}) == {"dags/one.py", "dags/two.py", "common/utils.py"}
