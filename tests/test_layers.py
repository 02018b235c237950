"""The import structure: lower layers never import upper ones, even inside a function, and no
semvec module imports itself back through others (STYLE lesson 12)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "semvec"

# Lowest first. A module may import modules of its own layer or below, never above.
LAYERS = [
    ("foundation", ["semvec", "semvec.errors", "semvec.redact", "semvec.crashpoints"]),
    ("settings and stores", ["semvec.storage", "semvec.config", "semvec.options", "semvec.lease",
                             "semvec.cluster", "semvec.metrics", "semvec.datasets"]),
    ("tracking", ["semvec.tracking"]),
    ("model directories", ["semvec.models", "semvec.extras"]),
    ("inference", ["semvec.encode", "semvec.heads", "semvec.static", "semvec.chunking",
                   "semvec.precision", "semvec.tokens"]),
    ("backfill and evaluation", ["semvec.backfill", "semvec.evaluate", "semvec.compress",
                                 "semvec.distill", "semvec.words", "semvec.search",
                                 "semvec.plot", "semvec.figures"]),
    ("training", ["semvec.train"]),
    ("retraining", ["semvec.retrain"]),
    ("entry points", ["semvec.cli", "semvec.testing"]),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every semvec module path imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        out |= {t.strip(".") for t in targets if t.strip(".") in known}
    return out - {name}


def _layer(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer of tests/test_layers.py: place it"
    return best[0]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, set(modules)) for name, path in modules.items()}


def test_no_module_imports_a_higher_layer():
    wrong = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
             for m, deps in _graph().items() for d in sorted(deps) if _layer(d) > _layer(m)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_inference_loads_no_training_code():
    code = ("import semvec.encode, semvec.backfill.stages, semvec.evaluate, sys; "
            "print([m for m in sys.modules if m.startswith(('semvec.train', 'semvec.retrain'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_command_line_is_parsed_without_torch_ray_or_transformers():
    """Every `semvec` command builds the whole parser first (its flags come from the configs): the
    configs import none of the heavy libraries, so `--help` and a refused flag answer at once."""
    code = ("import semvec.cli, sys; semvec.cli.build_parser(); "
            "heavy = {'torch', 'transformers', 'ray', 'mlflow'}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_layer_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from semvec.train import loop\n")
    assert "semvec.train.loop" in _imports(module, "semvec.x", {"semvec.train.loop"})
