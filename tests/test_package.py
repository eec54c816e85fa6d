"""The package as a whole: its modules import in one direction, and a wheel built from the
checkout runs the commands from any folder."""

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_imports(package_dir: Path, package: str) -> Dict[str, Set[str]]:
    """{module: modules of the package it imports}, every import statement counted, those
    inside functions too. ``from a import b`` counts as importing ``a.b`` when that is a module
    of the package, else ``a``."""
    modules = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_package)
    graph: Dict[str, Set[str]] = {}
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    assert package in graph, f"{package} not found under {package_dir}"
    return graph


def import_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle_among_the_package_modules():
    graph = module_imports(ROOT / "folding", "folding")
    assert len(graph) > 50 and graph["folding.run.train"], "the import graph was not read"
    assert import_cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (package / "c.py").write_text("import pkg.a\n\ndef g():\n    pass\n")
    (package / "d.py").write_text("from pkg import a, c\n")
    graph = module_imports(package, "pkg")
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg.a", "pkg.c"}
    assert import_cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_the_top_level_recipes_folder_is_the_packaged_one():
    """Users find recipes in recipes/; the wheel ships folding/recipes/: one copy of each file."""
    assert (ROOT / "recipes").resolve() == (ROOT / "folding" / "recipes").resolve()
    assert sorted(p.name for p in (ROOT / "folding" / "recipes").glob("*.yaml"))


def test_the_patches_import_name_still_offers_the_plugin():
    from folding import megatron_plugin
    from folding.megatron import plugin

    for name in ("add_arguments", "spec_from_args", "check_mesh", "check_mesh_hook",
                 "folded_decoder_spec", "layer_spec_provider"):
        assert getattr(megatron_plugin, name) is getattr(plugin, name)


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory):
    """The wheel of a copy of the checkout, unpacked into a folder of its own."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "folding", source / "folding",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(work / "dist"), str(source)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = (work / "dist").glob("folding-*.whl")
    site = work / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def _from_wheel(site: Path, cwd: Path, *args, timeout: float = 600):
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, "-m", "folding", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.smoke
def test_the_wheel_holds_the_recipes_and_runs_flags_from_another_folder(unpacked_wheel, tmp_path):
    where = _from_wheel(unpacked_wheel, tmp_path, "flags", "--recipe", "mixtral-8x22b", "--json")
    assert where.returncode == 0, where.stderr
    flags = json.loads(where.stdout)["flags"]
    assert flags[flags.index("--num-experts") + 1] == "8" and "--expert-model-parallel-size" in flags
    located = subprocess.run([sys.executable, "-c", "import folding; print(folding.__file__)"],
                             cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(unpacked_wheel)),
                             capture_output=True, text=True)
    assert Path(located.stdout.strip()).is_relative_to(unpacked_wheel), located.stdout
    recipes = sorted(p.name for p in (unpacked_wheel / "folding" / "recipes").glob("*.yaml"))
    assert recipes == sorted(p.name for p in (ROOT / "folding" / "recipes").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.smoke
def test_the_wheel_trains_two_steps_from_another_folder(unpacked_wheel, tmp_path):
    run = _from_wheel(unpacked_wheel, tmp_path, "train", "--steps", "2", "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["recipe"] == "tiny-moe" and summary["steps"] == 2 and summary["world_size"] == 8
    # the byte corpus shipped in the wheel was read: the first loss is near ln 256 = 5.55
    assert 5.0 < summary["first_loss"] < 6.0


PURE_MODULES = ("folding.mesh", "folding.recipe", "folding.cost.planner", "folding.cost.mfu_log",
                "folding.placement.solver", "folding.placement.milp",
                "folding.placement.chain_bound", "folding.dispatcher.send_plan",
                "folding.layout.parameters", "folding.layout.weights", "folding.megatron.mapping",
                "folding.megatron.flags")


def _loaded_after_importing(modules) -> set:
    code = ("import importlib, json, sys\n"
            f"for m in {list(modules)!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout))


def test_the_pure_layers_import_no_megatron_and_nothing_that_runs_ranks():
    """The pure core, cost models, placement solver, send planning, the parameter layout and
    the Megatron name mapping work without Megatron installed: they never import it."""
    loaded = _loaded_after_importing(PURE_MODULES)
    assert not {m for m in loaded if m == "megatron" or m.startswith("megatron.")}
    assert not {m for m in loaded if m.startswith(("folding.run", "folding.testing",
                                                   "folding.megatron.groups",
                                                   "folding.megatron.model"))}
    # the check sees Megatron where a module does import it
    assert "megatron.core" in _loaded_after_importing(["folding.dispatcher.moe_layer"])
