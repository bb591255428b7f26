"""The package's layering stays true: imports go downward only, no circles, no package-internal
imports inside functions, and the old import paths still work (with a DeprecationWarning)."""
import ast
import importlib
import pathlib
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "smoothness"
LAYERS = [  # lowest first; a module may import its own layer and the ones before it
    ("util", ("smoothness", "smoothness._moved", "smoothness.io_utils")),
    ("core", ("smoothness.models", "smoothness.diffusion", "smoothness.hooks", "smoothness.chain",
              "smoothness.data", "smoothness.metrics", "smoothness.cli", "smoothness.ranks", "smoothness.schedules",
              "smoothness.devices")),
    ("engines", ("smoothness.surface", "smoothness.cache")),
    ("analysis", ("smoothness.analysis", "smoothness.plan")),
    ("plots", ("smoothness.plots",)),
]
APPS = ("smoothness.figures", "smoothness.merge", "smoothness.data.train", "smoothness.data.sample", "smoothness.correlate",
        "smoothness.sample", "smoothness.train")
SIBLINGS = [("smoothness.surface", "smoothness.cache")]   # same layer, but neither imports the other


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def layer(name: str) -> int:
    last = name.rsplit(".", 1)[-1]
    if name in APPS or (last in ("cli", "__main__") and name != "smoothness.cli"):   # smoothness.cli: flag helpers
        return len(LAYERS)
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and (best is None or len(p) >= best[1]):
                best = (i, len(p))
    assert best is not None, f"{name} is in no layer: add it to LAYERS in tests/test_layers.py"
    return best[0]


def _resolve(name: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = name.split(".") if is_package(name) else name.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported smoothness module, line, inside a function) for every import statement."""
    tree = ast.parse(MODULES[name].read_text())
    found = []

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            local = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, local) for a in child.names if a.name.startswith("smoothness"))
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(name, child)
                if target.startswith("smoothness"):
                    for a in child.names:                            # "from pkg import submodule"
                        sub = f"{target}.{a.name}"
                        found.append((sub if sub in MODULES else target, child.lineno, local))
            visit(child, local)
    visit(tree, False)
    return found


def edges() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        targets = set()
        for target, _, _ in imports(name):
            while target not in MODULES:                              # a name inside a module: the module
                target = target.rsplit(".", 1)[0]
            if not name.startswith(target + ".") and target != name:  # a package's own submodules may import it
                targets.add(target)
        graph[name] = targets
    return graph


def test_every_module_has_a_layer():
    for name in MODULES:
        layer(name)


def test_imports_go_downward_only():
    bad = [f"{a} ({LAYERS[layer(a)][0] if layer(a) < len(LAYERS) else 'apps'}) imports {b} "
           f"({LAYERS[layer(b)][0] if layer(b) < len(LAYERS) else 'apps'})"
           for a, targets in edges().items() for b in targets if layer(b) > layer(a)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_sibling_engines_do_not_import_each_other():
    bad = [f"{a} imports {b}" for a, targets in edges().items() for b in targets for x, y in SIBLINGS
           if (a.startswith(x) and b.startswith(y)) or (a.startswith(y) and b.startswith(x))]
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    graph, state, cycles = edges(), {}, []

    def walk(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = "done"
    for n in sorted(graph):
        if n not in state:
            walk(n, [n])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_package_imports_inside_functions():
    bad = [f"{MODULES[n].relative_to(ROOT.parent)}:{line} imports {t}"
           for n in MODULES for t, line, local in imports(n) if local]
    assert not bad, "function-local imports of the package:\n" + "\n".join(bad)


def test_the_walker_sees_circles_and_upward_imports(tmp_path, monkeypatch):
    """The checks above can fail: a planted circle and an upward import are found."""
    fake = {"smoothness.a": tmp_path / "a.py", "smoothness.b": tmp_path / "b.py"}
    fake["smoothness.a"].write_text("from . import b\n")
    fake["smoothness.b"].write_text("def f():\n    from smoothness import a\n")
    monkeypatch.setattr(__import__(__name__), "MODULES", {**MODULES, **fake})
    graph = edges()
    assert graph["smoothness.a"] == {"smoothness.b"} and graph["smoothness.b"] == {"smoothness.a"}
    assert [line for _, line, local in imports("smoothness.b") if local] == [2]
    assert layer("smoothness.plots.x") > layer("smoothness.surface.y") > layer("smoothness.chain")


@pytest.mark.parametrize("old,new", sorted({
    "smoothness.engine": "smoothness.surface.engine", "smoothness.perturb": "smoothness.surface.perturb",
    "smoothness.scores": "smoothness.surface.scores", "smoothness.io": "smoothness.surface.io",
    "smoothness.stats": "smoothness.analysis.stats", "smoothness.plotting": "smoothness.plots.surfaces",
    "smoothness.classifier": "smoothness.data.classifier", "smoothness.correlate": "smoothness.analysis.correlate",
    "smoothness.sample": "smoothness.data.sample", "smoothness.train": "smoothness.data.train",
}.items()))
def test_old_import_paths_warn_and_give_the_new_module(old, new):
    import sys
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_moved_functions_warn_and_resolve():
    from smoothness.analysis import correlate, dynamics, spectral
    from smoothness.plots import analysis
    with pytest.warns(DeprecationWarning, match="correlation_scatter"):
        assert correlate.scatter is analysis.correlation_scatter
    with pytest.warns(DeprecationWarning, match="dynamics_heatmap"):
        assert dynamics.heatmap is analysis.dynamics_heatmap
    with pytest.warns(DeprecationWarning, match="spectral_norms"):
        assert spectral.plot is analysis.spectral_norms
    with warnings.catch_warnings(), pytest.raises(AttributeError):
        correlate.no_such_name
