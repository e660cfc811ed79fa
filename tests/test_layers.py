"""The folders are the architecture: read every import of model/, data/ and train/ (module level and inside functions
alike) and check that no modules import each other in a circle and that model/ and data/ stay below train/."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("model", "data", "train")
# What each lower layer must never import (STYLE.md: model/ knows tensors only, data/ knows nothing of models).
FORBIDDEN = {"model": ("data", "train"), "data": ("model", "train")}
MODEL_NEVER = ("deepspeed", "wandb")  # model/ is single-device tensors: no engine, no run logging


@dataclass(frozen=True)
class Import:
    source: str  # importing module ("train.eval" for train/eval/__init__.py)
    target: str  # imported module of ours: the most specific one named
    where: str  # file:line of the import statement


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()  # a package's __init__ is the package
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    files = sorted(p for layer in LAYERS for p in (REPO / layer).rglob("*.py"))
    return {module_name(p): p for p in files}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (`model.config.ModelConfig` -> model.config)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):  # every statement, also inside functions and `if TYPE_CHECKING:`
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            # `from pkg import sub` imports the module pkg.sub; `from pkg import name` imports pkg
            targets = [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved and resolved != name:
                found.append(Import(name, resolved, f"{path.relative_to(REPO)}:{node.lineno}"))
    return found


def import_graph() -> list[Import]:
    modules = our_modules()
    return [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]


def cycles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def test_the_graph_sees_the_imports_we_know_of():
    """The parser must find real imports, or the checks below would pass on an empty graph."""
    edges = {(e.source, e.target) for e in import_graph()}
    assert ("model.transformer", "model.loss") in edges  # module level
    assert ("model", "model.transformer") in edges  # inside model/__init__.py's __getattr__
    assert ("train.eval.run", "train.eval.config") in edges
    assert cycles([Import("a", "b", "x:1"), Import("b", "c", "x:2"), Import("c", "a", "x:3"),
                   Import("c", "d", "x:4")]) == [["a", "b", "c"]]


def test_no_import_circles():
    edges = import_graph()
    found = cycles(edges)
    explained = []
    for component in found:
        members = set(component)
        explained.append(" <-> ".join(component) + ":\n" + "\n".join(
            f"    {e.where}: {e.source} imports {e.target}" for e in edges
            if e.source in members and e.target in members))
    assert not found, "import circles:\n" + "\n".join(explained)


def test_model_and_data_never_import_the_layers_above():
    bad = [f"{e.where}: {e.source} imports {e.target}" for e in import_graph()
           if e.target.split(".")[0] in FORBIDDEN.get(e.source.split(".")[0], ())]
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_model_imports_no_engine_or_logging():
    bad = []
    for path in sorted((REPO / "model").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.relative_to(REPO)}:{node.lineno}: imports {n}" for n in names
                    if n.split(".")[0] in MODEL_NEVER]
    assert not bad, "model/ must stay free of DeepSpeed and wandb:\n" + "\n".join(bad)


def test_model_and_data_agree_on_the_ignored_label():
    """The label no loss is taken on is defined on both sides of the boundary (neither may import the other)."""
    import data.tokenizer
    import model.loss

    assert model.loss.IGNORE_INDEX == data.tokenizer.IGNORE_INDEX
