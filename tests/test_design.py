"""The shape docs/design.md promises: every top-level module is in the map's file table with
its layer, imports (counting those inside functions) never go to a higher layer, there is
no import circle, and no module imports a command-line program except those the map names.

    python tests/test_design.py [FOLDER]   # the import graph, one module per line, and each file's size
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The command-line programs. `dataset` and `export` are also libraries (their commands sit
# beside the code they drive); train.py is imported only where it is run in-process: bench.py
# times its train_one_epoch, the studies call train.main to avoid a process start per run.
CLIS = {"train", "predict", "export", "bench", "dataset"}
LIBRARY_CLIS = {"dataset", "export"}
MAY_IMPORT_A_CLI = {("bench", "train"), ("study_ablation", "train"), ("study_postprocessing", "train")}
LAYER_ROW = re.compile(r"^\| `(\w+)\.py` \| (\d) \|", re.M)


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


def design_layers(design: str) -> dict[str, int]:
    """{module: layer} from the file table of docs/design.md (rows `| `name.py` | layer | job |`)."""
    return {name: int(layer) for name, layer in LAYER_ROW.findall(design)}


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[tuple[str, str]]:
    """(module, target) pairs where a module imports one of a higher layer than its own."""
    return sorted((m, t) for m, targets in graph.items() for t in targets if layers[t] > layers[m])


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


def long_functions(text: str, limit: int = 40) -> list[str]:
    """Names of the functions and methods of a module source longer than `limit` lines."""
    nodes = (n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return [n.name for n in nodes if n.end_lineno - n.lineno + 1 > limit]


def test_cycle_finder_finds_a_circle_through_a_function_level_import():
    sources = {"a": "import b\n", "b": "def f():\n    import c\n", "c": "from a import x\n", "d": "import a\n"}
    graph = import_graph(sources)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) and set(cycles(graph)[0]) == {"a", "b", "c"}
    assert cycles(import_graph({"a": "import b\n", "b": "import os\n"})) == []
    assert import_graph({"hub": "ENTRY_MODULES = ('a',)\n", "a": ""})["hub"] == {"a"}


def test_layer_check_finds_an_upward_import():
    design = "| `low.py` | 1 | a leaf |\n| `high.py` | 3 | a script |\n"
    layers = design_layers(design)
    assert layers == {"low": 1, "high": 3}
    assert upward_imports({"low": {"high"}, "high": set()}, layers) == [("low", "high")]
    assert upward_imports({"low": set(), "high": {"low"}}, layers) == []


def test_no_import_circles_counting_imports_inside_functions():
    assert cycles(import_graph(repo_sources())) == []


def test_every_module_is_in_the_map_and_imports_only_its_layer_or_lower():
    layers = design_layers((ROOT / "docs" / "design.md").read_text())
    graph = import_graph(repo_sources())
    missing = sorted(set(graph) - set(layers))
    assert missing == [], f"docs/design.md's file table has no row `| `<name>.py` | <layer> | ... |` for {missing}"
    assert sorted(set(layers) - set(graph)) == [], "docs/design.md names modules that do not exist"
    assert upward_imports(graph, layers) == []


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


def test_one_predictor_serves_training_prediction_the_hub_export_and_bench():
    graph = import_graph(repo_sources())
    assert all("inference" in graph[m] for m in ("validation", "predict", "hubconf", "export", "bench"))


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    sources = repo_sources(root)
    graph = import_graph(sources)
    width = max(map(len, graph))
    for module in sorted(graph):
        print(f"{module:>{width}} -> {', '.join(sorted(graph[module])) or '-'}")
    print("circles:", "; ".join(" -> ".join(c) for c in cycles(graph)) or "none")
    print(f"\n{'module':>{width}}  lines  functions over 40 lines")
    for module, text in sorted(sources.items(), key=lambda item: -len(item[1].splitlines())):
        long = long_functions(text)
        print(f"{module:>{width}} {len(text.splitlines()):>6}  {len(long)} {' '.join(long)}")
    total = sum(len(long_functions(text)) for text in sources.values())
    print(f"{'total':>{width}} {sum(len(t.splitlines()) for t in sources.values()):>6}  {total}")
