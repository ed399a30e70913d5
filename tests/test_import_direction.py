"""Folders depend one way, kernels <- prompts <- serving <- benchmarks, and no module
imports itself back through others. Imports are read from the source with `ast`, function-local
ones included, so a lazy import inside a function cannot hide a dependency."""
from __future__ import annotations

import ast
import os
from pathlib import Path

from promptmux.benchmarks.house_figures import (
    FOLDERS,
    ROOMS,
    folder_of,
    import_graph,
    imported_modules,
    module_cycles,
    room_of,
    upward_imports,
    upward_room_imports,
)

ROOT = Path(__file__).resolve().parents[1]


def test_every_folder_imports_only_folders_to_its_left():
    upward = upward_imports(import_graph(ROOT))
    assert not upward, (
        f"imports against the direction {' <- '.join(FOLDERS)} (a folder may import only the ones to its "
        "left); move the shared code left, or the importing code right:\n"
        + "\n".join(f"  {module} imports {target}" for module, target in upward)
    )


def test_rooms_of_serving_import_only_rooms_before_them():
    upward = upward_room_imports(import_graph(ROOT))
    assert not upward, (
        f"imports against the room order of serving/ ({' <- '.join(r or 'config' for r in ROOMS)}; a room may "
        "import only the ones before it): move the shared code to an earlier room, or the importing code to a "
        "later one:\n" + "\n".join(f"  {module} imports {target}" for module, target in upward)
    )
    assert room_of("promptmux.serving.engine.step.executor") == "engine/step"
    assert room_of("promptmux.serving.engine") == "engine" and room_of("promptmux.serving.config") == ""
    assert room_of("promptmux.prompts.store") is None


def test_serving_keeps_at_most_three_modules_at_its_root_and_every_module_in_a_room():
    serving = ROOT / "serving"
    assert len(list(serving.glob("*.py"))) <= 3, sorted(p.name for p in serving.glob("*.py"))
    rooms = {str(p.parent.relative_to(serving)) for p in serving.rglob("*.py")
             if "proto_gen" not in p.parts and p.parent != serving}
    assert rooms <= set(ROOMS), f"modules outside a known room: {sorted(rooms - set(ROOMS))}; add the room to ROOMS"


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


def test_the_kernels_folder_does_not_shadow_the_kernels_package_from_the_repository_root(tmp_path):
    """`kernels` is also a PyPI package (Hugging Face's hub kernels, which bitsandbytes and
    transformers import). From the repository root the current folder comes first on sys.path,
    so a regular package `kernels/` there would win over the installed one."""
    import subprocess
    import sys

    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("def get_kernel(repo_id):\n    return 'the installed package'\n")
    code = "import kernels, promptmux.kernels.prompt_concat; print(kernels.get_kernel('x'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(site)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "the installed package"
