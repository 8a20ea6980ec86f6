"""tfgpt uses Keras through its public API only: no `keras.src`, no underscore member of a Keras object.

Scanned: tfgpt/**/*.py and the three scripts. Allowed: `self._x` in a Keras subclass where `_x` is our own
(assigned or defined in that class) and Keras' base class has no member of that name; `obj._x` on anything
else only for the pairs in `OWN_PRIVATE` (our own non-Keras objects).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from pathlib import Path

import keras
import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "tfgpt").rglob("*.py")) + [REPO / n for n in ("train_keras.py", "generate.py", "evaluate.py")]
#: (object expression, attribute) pairs that reach into our own non-Keras objects.
OWN_PRIVATE = {("tokenizer", "_sp")}
KERAS_BASES = (keras.layers.Layer, keras.callbacks.Callback, keras.optimizers.Optimizer,
               keras.optimizers.schedules.LearningRateSchedule, keras.losses.Loss, keras.metrics.Metric)


def keras_members(cls: type) -> set[str]:
    """Names Keras defines on the nearest Keras class above `cls`: its class members and the instance
    attributes of a default instance (where one can be built without arguments)."""
    base = next(c for c in cls.__mro__ if c.__module__.startswith("keras"))
    names = set(dir(base))
    try:
        names |= set(vars(base()))
    except Exception:  # abstract, or needs arguments: class members only
        pass
    return names


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_of(path: Path, root: Path):
    """The imported module of a file inside a package under `root` (None for a top-level script)."""
    if not (path.parent / "__init__.py").is_file():
        return None
    parts = path.relative_to(root).with_suffix("").parts
    return importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))


def private_uses(path: Path, root: Path = REPO) -> list[str]:
    """Violations in one file, as 'file:line: what'."""
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(root)
    found = [f"{rel}:{i}: keras.src" for i, line in enumerate(text.splitlines(), 1) if "keras.src" in line]
    found += [f"{rel}:{text[: m.start()].count(chr(10)) + 1}: getattr of a private name"
              for m in re.finditer(r"\b(getattr|setattr|hasattr|delattr)\([^,]+,\s*[\"']_(?!_)", text)]
    tree = ast.parse(text)
    module = module_of(path, root)
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        obj = getattr(module, cls.name, None)
        if not (inspect.isclass(obj) and issubclass(obj, KERAS_BASES)):
            continue
        reserved = keras_members(obj)
        own = {n.name for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        own |= {t.attr for n in ast.walk(cls) if isinstance(n, ast.Assign | ast.AnnAssign | ast.AugAssign)
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
        for name in sorted(n for n in own if private(n) and n in reserved):
            found.append(f"{rel}:{cls.lineno}: {cls.name} overrides or sets Keras' private {name}")
        for node in ast.walk(cls):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
                    and private(node.attr) and (node.attr not in own or node.attr in reserved)):
                found.append(f"{rel}:{node.lineno}: self.{node.attr} of a Keras class ({cls.name})")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and private(node.attr)
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                and (ast.unparse(node.value), node.attr) not in OWN_PRIVATE):
            found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_sources_use_only_public_keras_api():
    assert {p.name for p in SOURCES} >= {"model.py", "optim.py", "callbacks.py", "train_keras.py"}
    violations = [v for path in SOURCES for v in private_uses(path)]
    assert not violations, "private Keras API (or private members of other objects):\n" + "\n".join(violations)


def probe(tmp_path: Path, monkeypatch, source: str) -> list[str]:
    name = "scan_probe_" + re.sub(r"\W", "_", tmp_path.name)  # a fresh package per test
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "probe.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in (name, f"{name}.probe"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    return private_uses(package / "probe.py", tmp_path)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from keras.src import tree\n", "keras.src"),
        ("def f(model):\n    return model._loss_tracker\n", "model._loss_tracker"),
        ("def f(model):\n    return getattr(model, '_compute_loss')\n", "getattr of a private name"),
        ("def f(opt):\n    return super(type(opt), opt)._clip_gradients\n", "._clip_gradients"),
        ("import keras\nclass O(keras.optimizers.AdamW):\n    def _clip_gradients(self, g):\n        return g\n",
         "overrides or sets Keras' private _clip_gradients"),
        ("import keras\nclass M(keras.Model):\n    def f(self):\n        return self._loss_tracker\n",
         "self._loss_tracker of a Keras class"),
        ("import keras\nclass C(keras.callbacks.Callback):\n    def f(self):\n        self._model = None\n",
         "overrides or sets Keras' private _model"),
    ],
)
def test_the_scan_catches_each_kind_of_private_use(tmp_path, monkeypatch, source, expected):
    found = probe(tmp_path, monkeypatch, source)
    assert any(expected in v for v in found), found


def test_the_scan_allows_our_own_private_names(tmp_path, monkeypatch):
    source = (
        "import keras\n"
        "class C(keras.callbacks.Callback):\n"
        "    def __init__(self):\n        super().__init__()\n        self._writer = None\n"
        "    def _flush(self):\n        return self._writer\n"
        "def f(tokenizer):\n    return tokenizer._sp\n"
    )
    assert probe(tmp_path, monkeypatch, source) == []
