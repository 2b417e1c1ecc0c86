"""The plan of the house: packages by role, imports that only run down, no circles.

    common                         the ground: errors, the CLI machinery, shared helpers
    data, losses, autoencoder      sources and streams; the loss terms and networks; the model
    metrics                        PSNR/SSIM, rFID, reconstruct + image metrics, grids
    training, evaluation           the training config, checkpointing, the run log; the evaluator's config and tables
    publishing                     the exported folder, the model card, the Hub
    train_vae, eval_vae            the two scripts

A module may import its own package and any package on a lower floor, never one on its own floor
(packages on one floor know nothing of each other) or above it. Imports of our own modules sit at
module level, where this test (and a reader) sees them: a function-local import that hides a
circle is a defect.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORS = {
    "common": 0,
    "data": 1,
    "losses": 1,
    "autoencoder": 1,
    "metrics": 2,
    "training": 3,
    "evaluation": 3,
    "publishing": 4,
    "train_vae": 5,
    "eval_vae": 5,
}
NOT_IN_THE_HOUSE = {"tests", "benchmarks", "docs", "accelerate_configs", "outputs"}


def house_sources() -> dict[str, str]:
    """{dotted module name: source} of every module of the product (packages and the two scripts)."""
    found = {}
    for entry in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, entry)
        if entry.endswith(".py"):
            with open(path) as f:
                found[entry[:-3]] = f.read()
        elif os.path.isfile(os.path.join(path, "__init__.py")) and entry not in NOT_IN_THE_HOUSE:
            for folder, _, files in os.walk(path):
                for file in sorted(files):
                    if file.endswith(".py"):
                        rel = os.path.relpath(os.path.join(folder, file), ROOT)[:-3].split(os.sep)
                        name = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
                        with open(os.path.join(folder, file)) as f:
                            found[name] = f.read()
    return found


def own_imports(module: str, source: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module of ours, line, at module level) of every import statement in `source`."""
    tree = ast.parse(source)
    top_level = {id(node) for node in tree.body}
    package = module if f"{module}.__init__" in known or any(k.startswith(module + ".") for k in known) else None
    package = package or module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import name`: name may be a submodule of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target:
                found.append((target, node.lineno, id(node) in top_level))
    return found


def violations(sources: dict[str, str]) -> list[str]:
    """Every upward or sideways import, function-local import of ours, unplaced package and circle."""
    known = set(sources)
    problems, graph = [], {m: set() for m in sources}
    for module, source in sources.items():
        top = module.split(".")[0]
        if top not in FLOORS:
            problems.append(f"{module}: package {top!r} has no floor in the plan (FLOORS)")
            continue
        for target, line, module_level in own_imports(module, source, known):
            other = target.split(".")[0]
            if target != module:
                graph[module].add(target)
            if not module_level:
                problems.append(f"{module}:{line} imports {target} inside a function")
            if other != top and FLOORS.get(other, -1) >= FLOORS[top]:
                problems.append(
                    f"{module}:{line} imports {target} (floor {FLOORS.get(other)}) from floor {FLOORS[top]}"
                )
    problems += [f"circle: {' -> '.join(c)}" for c in circles(graph)]
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One closed path per circle found by a depth-first search of the module graph."""
    found, state = [], {}
    for start in sorted(graph):
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = "open"
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = "done"
                stack.pop()
                path.pop()
            elif state.get(child) == "open":
                found.append(path[path.index(child) :] + [child])
            elif child not in state:
                state[child] = "open"
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return found


def test_imports_run_down_without_circles():
    sources = house_sources()
    assert {m.split(".")[0] for m in sources} == set(FLOORS), "a package is missing from the plan or the tree"
    assert violations(sources) == []


def test_every_package_says_what_it_holds():
    for name, source in house_sources().items():
        if "." in name or name in ("train_vae", "eval_vae"):
            continue
        doc = ast.get_docstring(ast.parse(source))
        assert doc and "\n" not in doc.strip(), f"{name}/__init__.py needs a one-line docstring saying what it holds"


@pytest.mark.parametrize(
    ("module", "bad_line", "expected"),
    [
        ("common.helpers", "import train_vae", "common.helpers:1 imports train_vae (floor 5) from floor 0"),
        ("losses.functional", "from data import specs", "losses.functional:1 imports data.specs (floor 1)"),
        ("metrics.pixel", "def f():\n    import publishing.card", "metrics.pixel:2 imports publishing.card inside"),
    ],
)
def test_an_upward_sideways_or_hidden_import_is_caught(module, bad_line, expected):
    sources = house_sources()
    sources[module] = bad_line + "\n" + sources[module]
    found = violations(sources)
    assert any(p.startswith(expected) for p in found), found


def test_a_circle_is_caught():
    sources = house_sources()
    # training.runlog already imports training.curves: the reverse import closes a circle inside one package.
    sources["training.curves"] = "from training import runlog\n" + sources["training.curves"]
    found = violations(sources)
    assert "circle: training.runlog -> training.curves -> training.runlog" in found, found
