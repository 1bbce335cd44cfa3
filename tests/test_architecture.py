"""The import rules of the house, checked on the source tree with `ast` (imports inside functions count too;
those under `if TYPE_CHECKING:` do not, since they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"

# The floor below everything: modules any package may import.
BOTTOM = {"moelm", "moelm.config", "moelm.constants", "moelm.files", "moelm.devices"}
# package -> packages it must never import
FORBIDDEN = {
    "moelm.infer": ("moelm.train", "moelm.eval", "moelm.serve", "moelm.cli"),
    "moelm.serve": ("moelm.train", "moelm.eval", "moelm.cli"),
    "moelm.eval": ("moelm.train", "moelm.cli"),
    "moelm.data": ("moelm.train", "moelm.model", "moelm.eval", "moelm.infer", "moelm.cli"),
    "moelm.train": ("moelm.cli",),
    "moelm.analysis": ("moelm.train", "moelm.eval", "moelm.serve", "moelm.dist", "moelm.cli"),
    "moelm.dist": ("moelm.train", "moelm.eval", "moelm.infer", "moelm.serve", "moelm.cli"),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """moelm modules that the file at `path` (module `name`) imports, resolved to modules where possible."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if _type_checking_only(node) for n in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from moelm.model import experts` names a module; `from moelm.model import MoELM` does not
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "moelm" or t.startswith("moelm."))
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    return {name: imported_modules(path, name, set(files)) - {name} for name, path in files.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every broken rule, one line each."""
    problems = []
    for module, imports in sorted(graph.items()):
        for target in sorted(imports):
            if module.startswith("moelm.model") and not (target in BOTTOM or target.startswith("moelm.model")):
                problems.append(f"{module} imports {target}: model/ may import only config, constants, files")
            for package, banned in FORBIDDEN.items():
                if module.startswith(package) and target.startswith(banned):
                    problems.append(f"{module} imports {target}: {package} must not import {', '.join(banned)}")
            inside_cli = module == "moelm.cli" or module.startswith("moelm.cli.")
            if (target == "moelm.cli" or target.startswith("moelm.cli.")) and not inside_cli:
                if module != "moelm.__main__":
                    problems.append(f"{module} imports {target}: nothing outside the CLI imports it")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (package __init__ re-exports excluded)."""
    edges = {m: {t for t in targets if t in graph and not _is_package(t, graph)} for m, targets in graph.items()}
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                found.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def _is_package(name: str, graph: dict[str, set[str]]) -> bool:
    return any(other.startswith(name + ".") for other in graph)


def test_the_source_tree_follows_the_import_rules():
    assert violations(import_graph(SOURCE)) == []


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("moelm/model/bad.py", "from moelm.train.trainer import Trainer\n", "model/ may import only"),
        ("moelm/data/bad.py", "def f():\n    from moelm.model.transformer import MoELM\n", "moelm.data must not"),
        ("moelm/infer/bad.py", "import moelm.eval.harness\n", "moelm.infer must not"),
        ("moelm/eval/bad.py", "from moelm.train import trainer\n", "moelm.eval must not"),
        ("moelm/train/bad.py", "from moelm.cli import main\n", "nothing outside the CLI imports it"),
        ("moelm/config.py", "from moelm.model.transformer import MoELM\n", "import cycle"),
    ],
)
def test_a_planted_violation_is_caught(tmp_path, path, source, expected):
    import shutil

    root = tmp_path / "src"
    shutil.copytree(SOURCE / "moelm", root / "moelm", ignore=shutil.ignore_patterns("__pycache__"))
    target = root / path
    target.write_text((target.read_text() if target.exists() else "") + source)
    assert any(expected in line for line in violations(import_graph(root)))


def test_type_checking_imports_do_not_count(tmp_path):
    (tmp_path / "moelm" / "model").mkdir(parents=True)
    planted = tmp_path / "moelm" / "model" / "typed.py"
    planted.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from moelm.train import trainer\n")
    assert imported_modules(planted, "moelm.model.typed", set()) == set()
