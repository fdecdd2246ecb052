"""The dependency direction, checked on the source: core <- runtime <- export/bench, core <- train <- compress,
and an app layer (CLI, pipeline, evaluator, compare) on top that nothing imports. Rooms follow pyproject's
package-dir mapping (`train/` is `emoverse.train`, ...); imports inside functions count too."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = {"emoverse/cli.py", "emoverse/pipeline.py", "emoverse/evaluate.py", "emoverse/compare.py"}
ALLOWED = {
    "core": set(),
    "runtime": {"core"},
    "export": {"core", "runtime"},
    "bench": {"core", "runtime", "export", "train"},
    "train": {"core"},
    "compress": {"core", "train"},
    "app": {"core", "runtime", "export", "bench", "train", "compress"},
}


def _mapping() -> dict[str, str]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return cfg["tool"]["setuptools"]["package-dir"]


def _room_of_folder(folder: str) -> str:
    return "core" if folder.startswith("emoverse") else folder


def _edges():
    mapping = _mapping()  # package -> folder
    by_len = sorted(mapping, key=len, reverse=True)

    def room_of_module(mod: str) -> str | None:
        for pkg in by_len:
            if mod == pkg or mod.startswith(pkg + "."):
                rel = mapping[pkg] + mod[len(pkg) :].replace(".", "/")
                if rel + ".py" in APP:
                    return "app"
                return _room_of_folder(mapping[pkg])
        return None

    for folder in sorted(set(mapping.values())):
        for f in (ROOT / folder).glob("*.py"):
            rel = str(f.relative_to(ROOT))
            if f.name.startswith("test_") or f.name == "conftest.py":
                continue
            room = "app" if rel in APP else _room_of_folder(folder)
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("emoverse"):
                    targets = (
                        [node.module + "." + a.name for a in node.names] if node.module == "emoverse" else [node.module]
                    )
                elif isinstance(node, ast.Import):
                    targets = [a.name for a in node.names if a.name.startswith("emoverse")]
                else:
                    continue
                for t in targets:
                    dep = room_of_module(t)
                    if dep and dep != room:
                        yield rel, room, t, dep


def test_dependencies_point_one_way():
    bad = [f"{rel} ({room}) imports {mod} ({dep})" for rel, room, mod, dep in _edges() if dep not in ALLOWED[room]]
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_allowed_graph_has_no_cycle():
    seen, stack = set(), set()

    def visit(n):
        assert n not in stack, f"cycle through {n}"
        if n in seen:
            return
        stack.add(n)
        for m in ALLOWED[n]:
            visit(m)
        stack.discard(n)
        seen.add(n)

    for n in ALLOWED:
        visit(n)


def test_the_checker_sees_imports_inside_functions():
    edges = list(_edges())
    assert any(rel == "emoverse/cli.py" and dep == "bench" for rel, _, _, dep in edges)
    assert any(room == "runtime" and dep == "core" for _, room, _, dep in edges)


def test_cli_runtime_and_bench_import_without_torch():
    """The lazy imports that remain exist for this: an onnxruntime-only install runs `emoverse run/bench`."""
    import subprocess
    import sys

    code = (
        "import sys, emoverse.cli, emoverse.runtime.backends, emoverse.runtime.ort, emoverse.bench.runner; "
        "print(sorted(m for m in ('torch', 'transformers', 'llmcompressor', 'modelopt') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
