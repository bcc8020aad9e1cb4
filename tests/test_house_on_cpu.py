"""The house's shape, read from the source (docs/architecture.md): rooms import only rooms below them, and
no function is too long to hold in one's head.

A room is a top-level module of opdcache/ or one of its folders (rollout/, score/, ...). Every import
counts: top-level, deferred (inside a function) and ``TYPE_CHECKING`` ones. A room's floor is one above
the highest room it imports; an arrow back up is an import of a room on the same floor or higher, which
is exactly an import inside a circle.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "opdcache"
LONGEST_FUNCTION = 100  # lines, decorators excluded


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "opdcache" or len(parts) == 1:
        return None
    return parts[1] + "/" if (PKG / parts[1]).is_dir() else parts[1]


def _imported(path: Path, tree: ast.Module) -> list[tuple[str, int]]:
    """(module, line) of every opdcache import in the file, relative ones resolved."""
    here = _module(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
                )
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names] + [(base, node.lineno)]
    return [(m, line) for m, line in out if m.startswith("opdcache")]


def _graph(room_of) -> dict[str, dict[str, list[str]]]:
    """room -> imported room -> ['file:line', ...]"""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(PKG.rglob("*.py")):
        src = room_of(_module(path))
        if src is None:  # opdcache/__init__.py: the package's version only
            continue
        graph.setdefault(src, {})
        for module, line in _imported(path, ast.parse(path.read_text())):
            # `from opdcache.x import name`: the room of x.name when it is a module, else of x
            dst = room_of(module) if _exists(module) else room_of(module.rsplit(".", 1)[0])
            if dst and dst != src:
                graph[src].setdefault(dst, []).append(f"{path.relative_to(PKG.parent)}:{line}")
    return graph


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:]) if "." in module else Path()
    return (PKG / rel).with_suffix(".py").exists() or (PKG / rel).is_dir()


def _circles(graph: dict[str, dict[str, list[str]]]) -> list[set[str]]:
    """The strongly connected components of more than one room (a naive reachability closure)."""
    reach = {r: set(graph[r]) for r in graph}
    changed = True
    while changed:
        changed = False
        for r in reach:
            more = set().union(*(reach.get(d, set()) for d in reach[r])) - reach[r]
            if more:
                reach[r] |= more
                changed = True
    circles: list[set[str]] = []
    for r in graph:
        scc = {r} | {d for d in reach[r] if r in reach.get(d, set())}
        if len(scc) > 1 and scc not in circles:
            circles.append(scc)
    return circles


def _floors(graph: dict[str, dict[str, list[str]]]) -> dict[str, int]:
    floors: dict[str, int] = {}

    def floor(r: str, path: tuple[str, ...] = ()) -> int:
        if r not in floors:
            below = [floor(d, path + (r,)) for d in graph.get(r, {}) if d not in path + (r,)]
            floors[r] = 1 + max(below, default=0)
        return floors[r]

    for r in graph:
        floor(r)
    return floors


def test_rooms_import_only_rooms_below_them():
    graph = _graph(_room)
    assert len(graph) > 20 and "config" in graph and "rollout/" in graph
    circles = _circles(graph)
    floors = _floors(graph)
    up = [
        f"{a} (floor {floors[a]}) -> {b} (floor {floors[b]}): {', '.join(where)}"
        for a in graph
        for b, where in graph[a].items()
        if floors[b] >= floors[a]
    ]
    assert circles == [], circles
    assert up == [], "\n".join(up)
    # the config stands below every stage: it reaches none of them (issue 43)
    assert (
        _reach(graph, "config") & {"rollout/", "teacher/", "score/", "train/", "models/", "cache/"} == set()
    )
    assert floors["cli"] == max(floors.values())


def _reach(graph: dict[str, dict[str, list[str]]], room: str) -> set[str]:
    seen, todo = set(), [room]
    while todo:
        for d in graph.get(todo.pop(), {}):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_no_file_is_in_an_import_circle():
    graph = _graph(lambda m: m if m.startswith("opdcache") else None)
    assert _circles(graph) == []


def test_the_checker_sees_a_circle_and_an_arrow_up():
    graph = {"a": {"b": ["a.py:1"]}, "b": {"c": ["b.py:1"]}, "c": {"a": ["c.py:9"]}, "d": {"a": ["d.py:1"]}}
    assert _circles(graph) == [{"a", "b", "c"}]
    dag = {"a": {"b": []}, "b": {"c": []}, "c": {}, "d": {"a": [], "c": []}}
    assert _floors(dag) == {"c": 1, "b": 2, "a": 3, "d": 4}


def _long_functions(limit: int) -> list[str]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_is_over_a_hundred_lines():
    assert _long_functions(LONGEST_FUNCTION) == []
    assert _long_functions(60), "the census sees functions at all"
