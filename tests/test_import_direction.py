"""Folders depend one way, kernels <- prompts <- serving <- benchmarks, and no module
imports itself back through others. Imports are read from the source with `ast`, function-local
ones included, so a lazy import inside a function cannot hide a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

from promptmux.benchmarks.house_figures import (
    FOLDERS,
    folder_of,
    import_graph,
    imported_modules,
    module_cycles,
    upward_imports,
)

ROOT = Path(__file__).resolve().parents[1]


def test_every_folder_imports_only_folders_to_its_left():
    upward = upward_imports(import_graph(ROOT))
    assert not upward, (
        f"imports against the direction {' <- '.join(FOLDERS)} (a folder may import only the ones to its "
        "left); move the shared code left, or the importing code right:\n"
        + "\n".join(f"  {module} imports {target}" for module, target in upward)
    )


def test_no_import_cycle_between_modules():
    cycles = module_cycles(import_graph(ROOT))
    assert not cycles, "modules that import one another (directly or through others):\n" + "\n".join(
        "  " + ", ".join(cycle) for cycle in cycles
    )


def test_the_reader_sees_function_local_relative_and_aliased_imports():
    source = '''
from __future__ import annotations
from typing import TYPE_CHECKING
from .engine import Engine
import promptmux.kernels.prompt_concat as concat
if TYPE_CHECKING:
    from promptmux.benchmarks.runner import Runner
def run():
    from ..prompts import store
    from promptmux.benchmarks import stats
'''
    known = {"promptmux.serving.engine", "promptmux.serving.cli", "promptmux.kernels.prompt_concat",
             "promptmux.prompts.store", "promptmux.benchmarks.stats", "promptmux.benchmarks.runner"}
    found = imported_modules(ast.parse(source), "promptmux.serving.cli", False, known)
    assert found == {"promptmux.serving.engine", "promptmux.kernels.prompt_concat", "promptmux.prompts.store",
                     "promptmux.benchmarks.stats"}
    graph = {"promptmux.serving.cli": found, "promptmux.benchmarks.stats": {"promptmux.serving.cli"}}
    graph.update({name: set() for name in known - set(graph)})
    assert upward_imports(graph) == [("promptmux.serving.cli", "promptmux.benchmarks.stats")]
    assert module_cycles(graph) == [["promptmux.benchmarks.stats", "promptmux.serving.cli"]]
    assert folder_of("promptmux.kernels.prompt_concat") == "kernels"
