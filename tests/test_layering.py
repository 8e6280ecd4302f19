"""The package's import direction: every hf_roste module imports only from its own layer or below.

The layers, lowest first (a module's layer is the first entry whose prefix names it):

    numerics, arch, io, folders, data,  leaves: tensors, family adapters, files on disk, the version,
    _version, progress                  progress bars
    config, targets                     RoSTEConfig (uses numerics' QuantSpec); the serving-target table
    state                               RoSTEState / get_state (what a prepared model knows)
    modules                             torch modules of a RoSTE model (numerics + state only)
    rotation                            fusing and switching rotations, the search
    convert, hub_kernels                prepare / finish a model (like transformers' integrations/<method>.py)
    export                              checkpoint format, dequantize, Hub push, compressed-tensors
    quantizer                           transformers' HfQuantizer hooks
    training, evaluation                RoSTESFTTrainer, LoRA, metrics
    demo                                the toy comparison
    commands, cli, hf_roste (package)   argument parsing and printing, the public API

Imports are read with `ast` (module level and inside functions; `if TYPE_CHECKING:` blocks are
annotations only and skipped). The test fails on an upward edge and on an import cycle between
modules, whatever the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_roste"

LAYERS: list[tuple[str, ...]] = [
    ("numerics", "arch", "io", "folders", "data", "_version", "progress"),
    ("config", "targets"),
    ("state",),
    ("modules",),
    ("rotation",),
    ("convert", "hub_kernels"),
    ("export",),
    ("quantizer",),
    ("training", "evaluation", "eval_protocols"),
    ("demo",),
    ("commands", "cli", ""),
]


def layer_of(module: str) -> int:
    """Layer index of dotted `module` (relative to hf_roste, "" for the package itself)."""
    head = module.split(".", 1)[0]
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"hf_roste.{module} is in no layer of tests/test_layering.py: add it to LAYERS.")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """hf_roste modules (relative dotted names) imported by `source`, outside `if TYPE_CHECKING:`."""
    tree = ast.parse(source)
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
               for stmt in node.body for n in ast.walk(stmt)}
    package = module.split(".") if is_package else module.split(".")[:-1]
    if module == "":
        package = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "hf_roste" or alias.name.startswith("hf_roste."):
                    found.add(alias.name.removeprefix("hf_roste").lstrip("."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else list(package)
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "hf_roste" or node.module.startswith("hf_roste.")):
                target = node.module.removeprefix("hf_roste").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from .x import y` may import the submodule x.y
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if (PACKAGE / Path(*sub.split("."))).with_suffix(".py").exists()
                          or (PACKAGE / Path(*sub.split(".")) / "__init__.py").exists() else target)
    found.discard(module)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    graph = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(path)
        graph[name] = imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")
    return graph


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        for dst in sorted(targets):
            if layer_of(dst) > layer_of(src):
                bad.append(f"hf_roste.{src} (layer {LAYERS[layer_of(src)]}) imports hf_roste.{dst} "
                           f"(layer {LAYERS[layer_of(dst)]})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), package __init__ files excluded
    (a package importing its own submodules to re-export them is not a cycle of concepts)."""
    packages = {name for name in graph if (PACKAGE / Path(*name.split(".")) / "__init__.py").exists()}
    nodes = [n for n in graph if n not in packages]
    edges = {n: [d for d in graph[n] if d in graph and d not in packages] for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def test_every_import_points_down_the_layers():
    graph = import_graph()
    assert "convert" in graph and "state" in graph and "numerics.hadamard" in graph
    assert upward_edges(graph) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_library_never_imports_the_commands():
    graph = import_graph()
    library = [m for m in graph if m.split(".")[0] not in ("commands", "cli", "")]
    assert [m for m in library if any(d.split(".")[0] == "commands" for d in graph[m])] == []


@pytest.mark.parametrize(
    ("module", "is_package", "source", "expected"),
    [
        ("export.hub", False, "from ..commands._common import load_model\n", "commands._common"),
        ("export.hub", False, "def f():\n    from hf_roste.commands import sft\n", "commands.sft"),
        ("modules.kv_cache", False, "import hf_roste.convert\n", "convert"),
        ("state", False, "from .rotation.fusion import set_rotation_config\n", "rotation.fusion"),
    ],
)
def test_an_upward_import_is_caught(module, is_package, source, expected):
    """The check is not vacuous: an import the layering forbids (e.g. export/ using commands/) fails it."""
    graph = import_graph()
    graph[module] = graph.get(module, set()) | imports_of(source, module, is_package)
    assert expected in graph[module]
    assert any(f"hf_roste.{module} " in edge and f"hf_roste.{expected} " in edge for edge in upward_edges(graph))


def test_type_checking_imports_and_cycles_are_handled():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .modules.attention import X\n"
    assert imports_of(source, "state", False) == set()
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
