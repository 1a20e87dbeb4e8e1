"""The tiers themselves: the core tier needs none of the optional packages and none of
its tests is skipped for lack of one; no module of nf4lib imports one that imports it."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_core_tier_runs_whole_with_the_extras_unimportable():
    env = dict(os.environ, NF4LIB_BLOCK_EXTRAS="1")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "core", "-q", "-p", "no:cacheprovider", "-x", str(ROOT / "tests")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    tail = out.stdout[-3000:]
    assert out.returncode == 0, tail + out.stderr[-2000:]
    summary = [line for line in tail.strip().splitlines() if " passed" in line][-1]
    assert "skipped" not in summary and "failed" not in summary, summary
    # every core test collected in a normal environment ran and passed with the extras blocked
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "core", "-q", "-p", "no:cacheprovider", "--collect-only", str(ROOT / "tests")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    ).stdout
    collected = int([line for line in listed.splitlines() if "tests collected" in line or "selected" in line][-1].split("/")[0].split()[0])
    assert int(summary.split(" passed")[0].split()[-1]) == collected, (summary, collected)


def _imports(path: pathlib.Path) -> set:
    """nf4lib modules imported by ``path`` (absolute and relative), at any depth."""
    pkg = path.relative_to(ROOT).with_suffix("").parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(pkg[: len(pkg) - node.level + 1]) if node.level else []
            mod = base + (node.module.split(".") if node.module else [])
            if node.module is None or node.level and not node.module:
                out.update(".".join(mod + [a.name]) for a in node.names)
            else:
                out.add(".".join(mod))
                out.update(".".join(mod + [a.name]) for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("nf4lib")}


def test_no_import_cycles():
    modules = {}
    for path in (ROOT / "nf4lib").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {m: {i for i in _imports(p) if i in modules and i != m and i != "nf4lib"} for m, p in modules.items() if m != "nf4lib"}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return trail + [nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, cycles[0]


# The package's layers, lowest first: a module may import its own folder and the folders
# before it, never one after (the top-level modules, nf4lib's public surface, may import any).
LAYERS = ("core", "ops", "backends", "formats", "weight", "transforms", "integrations", "tools")


def _layer(module: str):
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else None


def test_every_module_sits_in_a_layer_folder():
    top = sorted(p.name for p in (ROOT / "nf4lib").glob("*.py"))
    # the public surface: the package, its CLI entry, four public submodules, and the
    # name pickled NF4 weights refer to
    assert top == ["__init__.py", "__main__.py", "_tensor.py", "analysis.py", "distributed.py", "gptq.py", "hf.py"], top
    folders = sorted(p.name for p in (ROOT / "nf4lib").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(LAYERS + ("data",)), folders
    assert not list((ROOT / "nf4lib" / "data").rglob("*.py"))  # data/: the shipped calibration text, no code


def test_imports_only_go_down_the_layers():
    upward = []
    for path in (ROOT / "nf4lib").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        here = _layer(name)
        if here is None:
            continue
        for target in _imports(path):
            there = _layer(target)
            if there is not None and there > here:
                upward.append(f"{name} imports {target}")
            elif there is None and (ROOT / (target.replace(".", "/") + ".py")).exists() and target != "nf4lib.__main__":
                upward.append(f"{name} imports the public surface {target}")  # hf, distributed, analysis, gptq, _tensor
    assert not upward, upward
