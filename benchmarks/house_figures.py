"""The house's shape in figures: which folder imports which, module cycles, lines per folder
and per room of serving/, and the hand-written files one Generate passes.

Run from the repository root:

    python benchmarks/house_figures.py            # Markdown on stdout
    python benchmarks/house_figures.py --no-trace # the static figures only (no project import)

The static figures read the files with `ast`; the trace (benchmarks/request_trace.py) runs one
Generate through a replica built in this process.

Every import counts, function-local ones included; imports under `if TYPE_CHECKING:` are
left out (they run only in a type checker, so they make no import-time dependency).
An edge is one (importing module, imported module) pair; "kernels -> prompts" counts the
modules of `kernels/` that import a module of `prompts/`.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

# The one allowed direction: a folder may import the ones before it in this list, never after.
FOLDERS = ("kernels", "prompts", "serving", "benchmarks")
# Inside serving/ the same rule between rooms ("" is serving/'s root: config.py).
ROOMS = ("", "model", "engine", "engine/step", "rpc", "scheduling", "demo", "replica", "cli")
NAMESPACE = "promptmux"


def module_name(root: Path, path: Path) -> str:
    """`serving/engine/core.py` -> `promptmux.serving.engine.core`; `serving/__init__.py` -> `promptmux.serving`."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([NAMESPACE, *parts])


def source_files(root: Path) -> list[Path]:
    files = []
    for folder in FOLDERS:
        files += sorted(p for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def imported_modules(tree: ast.AST, this_module: str, is_package: bool, known: set[str]) -> set[str]:
    """Project modules this module imports anywhere in its body (function-local imports too)."""
    package = this_module if is_package else this_module.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        # `from promptmux.serving import engine` names a module; `from promptmux.serving.engine.core
        # import Engine` names a symbol: keep the longest prefix that is a known module.
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != this_module:
            found.add(name)

    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(NAMESPACE + "."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            elif node.module and node.module.startswith(NAMESPACE + "."):
                target = node.module
            else:
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                add(candidate if candidate in known else target)
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node of the module, function bodies included, except `if TYPE_CHECKING:` blocks."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: {project modules it imports}} for every module of the four folders."""
    files = source_files(root)
    names = {module_name(root, path): path for path in files}
    known = set(names)
    graph = {}
    for name, path in names.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = imported_modules(tree, name, path.name == "__init__.py", known)
    return graph


def folder_of(module: str) -> str:
    return module.split(".")[1]


def room_of(module: str) -> str | None:
    """The room of serving/ a module lies in (its package, for a package's __init__); None
    outside serving/. `promptmux.serving.engine.step.executor` -> `engine/step`."""
    parts = module.split(".")
    if parts[1] != "serving":
        return None
    inside = parts[2:]
    for depth in (2, 1):
        room = "/".join(inside[:depth])
        if room in ROOMS and len(inside) >= depth:
            return room
    return ""


def upward_room_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, imported module) pairs inside serving/ that import a room later in ROOMS."""
    rank = {room: i for i, room in enumerate(ROOMS)}
    found = []
    for module, targets in graph.items():
        here = room_of(module)
        if here is None:
            continue
        for target in targets:
            there = room_of(target)
            if there is not None and rank[there] > rank[here]:
                found.append((module, target))
    return sorted(found)


def folder_edges(graph: dict[str, set[str]]) -> Counter:
    """(from folder, to folder) -> number of module-to-module import edges, across folders only."""
    edges: Counter = Counter()
    for module, targets in graph.items():
        for target in targets:
            if folder_of(module) != folder_of(target):
                edges[(folder_of(module), folder_of(target))] += 1
    return edges


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, imported module) pairs that import a folder to the importer's right."""
    rank = {folder: i for i, folder in enumerate(FOLDERS)}
    return sorted(
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if rank[folder_of(target)] > rank[folder_of(module)]
    )


def module_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def folder_lines(root: Path) -> dict[str, tuple[int, int]]:
    """folder -> (python files, python lines), subfolders included."""
    figures = {}
    for folder in FOLDERS:
        files = [p for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts]
        figures[folder] = (len(files), sum(len(p.read_text().splitlines()) for p in files))
    return figures


def room_lines(root: Path) -> dict[str, tuple[int, int]]:
    """Each room of serving/ (a subfolder, its own subfolders counted apart) and its root ->
    (python files, python lines)."""
    serving = root / "serving"
    rooms: dict[str, list[Path]] = {}
    for path in serving.rglob("*.py"):
        if "__pycache__" in path.parts or "proto_gen" in path.parts:
            continue
        room = str(path.parent.relative_to(root))
        rooms.setdefault(room, []).append(path)
    return {room: (len(files), sum(len(p.read_text().splitlines()) for p in files))
            for room, files in sorted(rooms.items())}


def trace_report() -> str:
    """The files one Generate passes (benchmarks/request_trace.py), and which are entered more
    than once."""
    import os

    os.environ.setdefault("RAY_DISABLE_METRICS", "1")
    from promptmux.benchmarks.request_trace import report as trace_table, trace_generate

    root = Path(__file__).resolve().parents[1]
    trace = trace_generate(root)
    summary = trace.summary()
    many = ", ".join(f"`{f}`" for f in summary["entered_more_than_once"]) or "none"
    return ("## One Generate, traced\n\n" + trace_table(trace) +
            f"\nFiles entered more than once: {many}\n")


def report(root: Path) -> str:
    graph = import_graph(root)
    edges = folder_edges(graph)
    lines = ["## Folder dependency graph", "",
             "Module-to-module import edges between folders (function-local imports included);",
             f"allowed direction: {' <- '.join(FOLDERS)}.", "",
             "| from \\ to | " + " | ".join(FOLDERS) + " |",
             "|---|" + "---:|" * len(FOLDERS)]
    for source in FOLDERS:
        cells = ["-" if source == target else str(edges.get((source, target), 0)) for target in FOLDERS]
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    upward = upward_imports(graph)
    lines += ["", f"Upward imports (against the direction): {len(upward)}", ""]
    lines += [f"- `{module}` -> `{target}`" for module, target in upward]
    upward_rooms = upward_room_imports(graph)
    lines += ["", f"Imports against the room order of serving/ ({' <- '.join(r or 'config' for r in ROOMS)}): "
              f"{len(upward_rooms)}", ""]
    lines += [f"- `{module}` -> `{target}`" for module, target in upward_rooms]
    cycles = module_cycles(graph)
    lines += ["", f"Module import cycles (strongly connected groups): {len(cycles)}", ""]
    lines += ["- " + ", ".join(f"`{m}`" for m in cycle) for cycle in cycles]
    lines += ["", "## Lines per folder", "", "| folder | .py files | lines |", "|---|---:|---:|"]
    for folder, (count, total) in folder_lines(root).items():
        lines.append(f"| {folder} | {count} | {total} |")
    rooms = room_lines(root)
    lines += ["", "## Rooms of serving/", "", "| room | .py files | lines |", "|---|---:|---:|"]
    for room, (count, total) in rooms.items():
        lines.append(f"| `{room}/` | {count} | {total} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="repository root (default: this checkout)")
    parser.add_argument("--no-trace", action="store_true", help="skip the traced Generate (needs no model)")
    args = parser.parse_args(argv)
    sys.stdout.write(report(args.root))
    if not args.no_trace:
        sys.stdout.write("\n" + trace_report())


if __name__ == "__main__":
    main()
