"""data/'s modules import one another one way only: no import circle, counting imports inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"


def data_imports() -> dict[str, set[str]]:
    """module -> the data.* modules it imports anywhere in its source (top level or inside a function)."""
    graph = {}
    for path in DATA.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        graph[f"data.{path.stem}"] = {n for n in names if n.startswith("data.") and n != f"data.{path.stem}"}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    found = []

    def walk(node: str, trail: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in trail:
                found.append(trail[trail.index(nxt):] + [nxt])
            elif len(trail) < len(graph):
                walk(nxt, trail + [nxt])

    for start in graph:
        walk(start, [start])
    return found


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    assert not circles({"a": {"b", "c"}, "b": {"c"}, "c": set()})


def test_data_has_no_import_circle():
    graph = data_imports()
    assert "data.cli" in graph["data.stats"] and "data.dataset" in graph["data.released"]
    assert circles(graph) == []
