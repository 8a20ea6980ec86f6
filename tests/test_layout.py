"""The package's shape (the architecture map): no import circles, no module over 400 lines, the
modules that promise it import without TensorFlow, and nothing refers to files outside the repository."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tfgpt"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def tfgpt_imports() -> dict[str, set[str]]:
    """module -> the tfgpt modules it imports (anywhere in the file, lazy imports included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_no_import_circles_in_the_package():
    graph = tfgpt_imports()
    # a package's __init__ may re-export its submodules; the circle check is between modules
    edges = {m: {t for t in ts if not (t.startswith(m + ".") or m.startswith(t + "."))} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert "tfgpt.data" not in graph["tfgpt.tokenizer"] and "tfgpt.generation" not in graph["tfgpt.runs"]
    # the floors are one-way: run directories (tfgpt.runs) know nothing of training
    assert not {t for t in graph["tfgpt.runs"] if t.startswith("tfgpt.training")}


def test_training_names_are_listed_where_an_ide_sees_them():
    """tfgpt.training's lazy names: each in __all__, imported under TYPE_CHECKING, and found where _LAZY says."""
    import importlib

    import tfgpt.training as training

    tree = ast.parse((PACKAGE / "training" / "__init__.py").read_text())
    typed = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.If)
             for sub in node.body if isinstance(sub, ast.ImportFrom) for a in sub.names}
    lazy = set(training._WHERE)
    assert lazy <= set(training.__all__) and lazy == typed
    for name, module in training._WHERE.items():
        assert hasattr(importlib.import_module(module), name), (name, module)


def test_no_module_over_400_lines():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {k: v for k, v in sizes.items() if v > 400} == {}


def test_light_modules_import_without_tensorflow():
    code = ("import sys; import tfgpt, tfgpt.config, tfgpt.common, tfgpt.stories, tfgpt.story_files, tfgpt.cli, "
            "tfgpt.training, tfgpt.training.config; assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_nothing_refers_to_the_shared_folder_beside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    needle = "../" + "shared"
    hits = [f for f in files if (REPO / f).is_file() and (REPO / f).suffix in {".py", ".md", ".json", ".txt", ".toml", ""}
            and needle in (REPO / f).read_text(errors="replace")]
    assert hits == []
