"""The house plan, checked: who may import whom (in a fresh interpreter, via sys.modules) and no import cycles."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import ROOT

PACKAGES = ("probecal", "extract", "probes")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__main__":
                continue
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def loaded_after_import(modules: list[str]) -> set[str]:
    """sys.modules of a fresh interpreter after importing `modules` (extras such as fastapi may be absent)."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as err:\n"
        "        if 'probecal' in str(err) or name.split('.')[0] not in str(err):\n"
        "            raise\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _roots(names: set[str], prefix: str) -> list[str]:
    return sorted(n for n in names if n == prefix or n.startswith(prefix + "."))


CORE = [
    "probes",
    "probes.inference",
    "probes.estimators",
    "probes.calibration",
    "probes.artifact",
    "probes.scorer",
]


def test_probe_core_training_selection_and_evaluation_import_neither_torch_transformers_nor_extract():
    library = [
        m
        for m in project_modules()
        if m.startswith(("probes.evaluation", "probes.selection", "probes.training"))
    ]
    assert {"probes.training.train", "probes.selection.sweep", "probes.evaluation.outputs"} <= set(library)
    loaded = loaded_after_import(CORE + library)
    for forbidden in ("torch", "transformers", "extract", "fastapi", "hydra"):
        assert not _roots(loaded, forbidden), (
            f"probe core/training/selection/evaluation pulled in {forbidden}"
        )


def test_probe_core_does_not_lean_on_evaluation():
    assert not _roots(loaded_after_import(CORE), "probes.evaluation")


def test_scorer_loads_and_scores_with_numpy_and_safetensors_only(tmp_path):
    """Issue #11: serving teams embed ProbeScorer next to vLLM/SGLang; it must not pull scikit-learn, scipy,
    torch or transformers. The artifact is written here (that needs scikit-learn), scored in a fresh interpreter."""
    import numpy as np

    from probecal.fingerprint import ModelFingerprint
    from probes.artifact import ProbeArtifact
    from probes.calibration import PerCategoryCalibrator
    from probes.estimators import LogisticProbe

    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 16))
    y = (X[:, 0] + rng.normal(size=120) > 0).astype(int)
    cats = np.where(np.arange(120) % 2 == 0, "a", "b")
    probe = LogisticProbe(C=1.0).fit(X, y)
    calibrator = PerCategoryCalibrator(base="isotonic", min_count=10).fit(probe.decision_function(X), y, cats)
    fingerprint = ModelFingerprint("tiny", "f" * 64, "LlamaForCausalLM", 16, 2)
    artifact = ProbeArtifact.create(probe, calibrator, 1, "answer_last", fingerprint)
    artifact.save(tmp_path)
    expected = artifact.predict(X[:4], categories=cats[:4])[0]
    code = (
        "import json, sys, numpy as np\n"
        "from probes.scorer import ProbeScorer\n"
        f"s = ProbeScorer({str(tmp_path)!r})\n"
        f"p = s.p_correct(np.array({X[:4].tolist()!r}), categories={cats[:4].tolist()!r})\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy', 'torch', 'transformers')]\n"
        "print(json.dumps({'p': p.tolist(), 'heavy': sorted(heavy)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"ProbeScorer pulled in {result['heavy'][:5]}"
    np.testing.assert_allclose(result["p"], expected, rtol=0, atol=1e-12)


def test_extract_never_imports_probes():
    extract = [m for m in project_modules() if m.startswith("extract")]
    loaded = loaded_after_import(extract)
    assert not _roots(loaded, "probes")


def test_shared_helpers_are_torch_free():
    loaded = loaded_after_import(["probecal", "probecal.files", "probecal.fingerprint", "probecal.splits"])
    for heavy in ("torch", "transformers", "sklearn", "extract", "probes"):
        assert not _roots(loaded, heavy), f"import probecal pulled in {heavy}"


def test_the_lazy_public_api_resolves_every_name_from_its_home_module():
    import importlib

    import probecal

    assert sorted(probecal.__all__) == sorted(probecal.MODULE_ATTRS)
    for name, module in probecal.MODULE_ATTRS.items():
        assert getattr(probecal, name) is getattr(importlib.import_module(module), name), name
    with pytest.raises(AttributeError, match="no attribute 'train_probes'"):
        probecal.train_probes  # noqa: B018 - a typo is an AttributeError, not None


def test_runtime_and_serving_stay_out_of_the_library():
    """The in-process runtime (probes.runtime) and HTTP (probes.serving) sit on top: training never loads them."""
    loaded = loaded_after_import(["probes.training", "probes.selection.sweep", "probes.evaluation.outputs"])
    assert not _roots(loaded, "probes.runtime") and not _roots(loaded, "probes.serving")


def test_nothing_outside_the_cli_imports_it():
    others = [m for m in project_modules() if not m.startswith("probes.cli")]
    loaded = loaded_after_import(others)
    assert not _roots(loaded, "probes.cli")


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in the file (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in known}
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle depth-first search meets in `graph` (module -> modules it imports), as a path a -> ... -> a."""
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(node, stack, on_stack):
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt in on_stack:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, stack, on_stack)
        on_stack.discard(stack.pop())
        done.add(node)

    for name in sorted(graph):
        if name not in done:
            visit(name, [], set())
    return cycles


def test_no_import_cycles():
    modules = project_modules()
    graph = {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}
    cycles = import_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_cycle_detector_finds_a_planted_cycle(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")  # a function-level import counts
    (tmp_path / "c.py").write_text("import a\n")
    known = {"a", "b", "c"}
    graph = {name: imports_of(tmp_path / f"{name}.py", known) for name in known}
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert import_cycles(graph) == [["a", "b", "a"]]
    assert import_cycles({"a": {"b"}, "b": set(), "c": {"a"}}) == []


def private_names_used(path: Path, known: set[str]) -> list[str]:
    """Underscore names `path` takes from another project module: `from m import _x`, `import m._x`, or `m._x` on
    a module it imported ("m._x at line n"); dunders (`__version__`) are public."""

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    found, modules = [], {}  # modules: local name -> the project module it is bound to
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES and any(map(private, alias.name.split("."))):
                    found.append(f"{alias.name} at line {node.lineno}")
                if alias.asname and alias.name in known:
                    modules[alias.asname] = alias.name
                elif not alias.asname and alias.name.split(".")[0] in PACKAGES:  # `import a.b` binds `a`
                    modules[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            for alias in node.names:
                if private(alias.name):
                    found.append(f"{node.module}.{alias.name} at line {node.lineno}")
                elif f"{node.module}.{alias.name}" in known:
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            value = node.value
            dotted = []
            while isinstance(value, ast.Attribute):
                dotted.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in modules:
                module = ".".join([modules[value.id], *dotted])
                if module in known:
                    found.append(f"{module}.{node.attr} at line {node.lineno}")
    return found


def test_no_module_uses_another_modules_underscore_names():
    """A name another module needs is public: an underscore name stays inside the module that defines it."""
    modules = project_modules()
    known = set(modules)
    used = {name: private_names_used(path, known) for name, path in modules.items()}
    assert not any(used.values()), "underscore names used across modules: " + "; ".join(
        f"{name}: {', '.join(hits)}" for name, hits in used.items() if hits
    )


def test_private_name_scan_sees_each_way_of_reaching_one(tmp_path):
    (tmp_path / "m.py").write_text(
        "from probes.serving.protocol import _stop, APIError\n"  # a private name imported
        "from probes.serving import serving as s\n"
        "import probes.serving.batcher\n"
        "import extract._hidden\n"  # a private module
        "def f():\n"
        "    s._failure(1); probes.serving.batcher._Pending; APIError._x\n"  # attributes of imported modules
        "    from probecal import __version__\n"  # dunders are public
    )
    known = {"probes.serving.protocol", "probes.serving.serving", "probes.serving.batcher", "probecal"}
    assert sorted(private_names_used(tmp_path / "m.py", known)) == [
        "extract._hidden at line 4",
        "probes.serving.batcher._Pending at line 6",
        "probes.serving.protocol._stop at line 1",
        "probes.serving.serving._failure at line 6",
    ]
