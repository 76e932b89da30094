"""The shape docs/design.md promises: the import graph between the top-level modules
(counting imports inside functions) has no circle, no module imports a CLI it should not,
and docs/design.md names every top-level file.

    python tests/test_design.py      # prints the import graph, one module per line
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The command-line programs: none of them is imported by another module, except train.py,
# whose train_one_epoch bench.py times (bench.py runs predict.py as a command instead).
CLIS = {"train", "predict", "export", "bench", "dataset"}
MAY_IMPORT_A_CLI = {("bench", "train")}
# `dataset` is a CLI too (synthesize, preprocess) but also the data library everything reads.
LIBRARY_CLIS = {"dataset", "export"}


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """{module: the top-level modules it imports anywhere in its file} for module sources.
    A module-level `ENTRY_MODULES = (...)` (hubconf.py, which imports these by name at run
    time under private names) counts as importing them."""
    graph = {name: set() for name in sources}
    for name, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["ENTRY_MODULES"]:
                found = set(ast.literal_eval(node.value))
            elif isinstance(node, ast.Import):
                found = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = {node.module.split(".")[0]}
            else:
                continue
            graph[name] |= {m for m in found if m in sources and m != name}
    return graph


def repo_sources(root: Path = ROOT) -> dict[str, str]:
    return {path.stem: path.read_text() for path in sorted(root.glob("*.py"))}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the path of modules that closes it (depth-first search)."""
    found, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state[target] == 1:
                found.append(path[path.index(target) :] + [module, target] if target in path else [module, target])
            elif state[target] == 0:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if state[module] == 0:
            visit(module, [])
    return found


def test_cycle_finder_finds_a_circle_through_a_function_level_import():
    sources = {"a": "import b\n", "b": "def f():\n    import c\n", "c": "from a import x\n", "d": "import a\n"}
    graph = import_graph(sources)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) and set(cycles(graph)[0]) == {"a", "b", "c"}
    assert cycles(import_graph({"a": "import b\n", "b": "import os\n"})) == []
    assert import_graph({"hub": "ENTRY_MODULES = ('a',)\n", "a": ""})["hub"] == {"a"}


def test_no_import_circles_counting_imports_inside_functions():
    assert cycles(import_graph(repo_sources())) == []


def test_no_module_imports_a_command_line_program():
    graph = import_graph(repo_sources())
    offending = sorted(
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if target in CLIS - LIBRARY_CLIS and (module, target) not in MAY_IMPORT_A_CLI
    )
    assert offending == []
    assert not {m for m, targets in graph.items() if "predict" in targets}, "predict.py is the CLI only"


def test_inference_is_what_train_predict_hub_export_and_bench_share():
    graph = import_graph(repo_sources())
    assert all("inference" in graph[m] for m in ("train", "predict", "hubconf", "export", "bench"))
    assert graph["inference"] <= {"background", "dataset", "network", "utils"}


def test_design_doc_names_every_top_level_file():
    design = (ROOT / "docs" / "design.md").read_text()
    missing = [p.name for p in sorted(ROOT.glob("*.py")) if f"`{p.name}`" not in design]
    assert missing == [], f"docs/design.md does not name {missing}"


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    graph = import_graph(repo_sources(root))
    for module in sorted(graph):
        print(f"{module:>14} -> {', '.join(sorted(graph[module])) or '-'}")
    print("circles:", "; ".join(" -> ".join(c) for c in cycles(graph)) or "none")
