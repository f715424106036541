"""The package's shape: dependencies run one way, the library stands alone, the map is true."""

import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "alexnet_jax")
# Imported inside functions only: optional or heavy, and needed by few paths.
LAZY_IMPORTS = (
    "tensorflow",  # the tf.data sources (never on the synthetic or prepared paths)
    "tensorflow_datasets",
    "alexnet_jax.data.tf_sources",  # imports TensorFlow
    "alexnet_jax.data.tf_pipeline",  # imports TensorFlow
    "alexnet_jax.data.prepared",  # array_record and libjpeg-turbo, for prepared records only
    "torch",  # reading .pth files
    "tensorboardX",  # imported with torch hidden (metrics.summary_writer)
    "matplotlib",  # figures
    "sklearn",  # the digits source only
    "grain",
    "jax.experimental.jax2tf",  # exporting a SavedModel
    "jax2onnx",  # exporting ONNX (the optional [onnx] extra)
)


def modules() -> dict[str, str]:
    """Module name -> file, for every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def imports(path: str, module: str) -> list[tuple[list[str], bool]]:
    """For every import statement of a file: the names it may import (``from a import b``:
    ``a`` and ``a.b``) and whether it sits inside a function."""
    tree = ast.parse(open(path).read())
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inside.update(id(child) for child in ast.walk(node) if child is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [([alias.name], id(node) in inside) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}".rstrip(".")
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            found.append((names, id(node) in inside))
    return found


def dependency_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for module, path in known.items():
        deps = set()
        for names, _ in imports(path, module):
            for name in names:
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name and name not in (module, "alexnet_jax"):
                    deps.add(name)
        graph[module] = deps
    return graph


def test_no_import_cycles_counting_imports_inside_functions():
    graph = dependency_graph()
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
    assert len(graph) > 15 and any(graph.values())  # the walk saw the package


def test_imports_inside_functions_are_only_optional_heavy_dependencies():
    def allowed(name: str) -> bool:
        return any(name == m or name.startswith(m + ".") for m in LAZY_IMPORTS)

    lazy = [
        f"{module}: {names[-1]}"
        for module, path in modules().items()
        for names, inside in imports(path, module)
        if inside and not any(allowed(name) for name in names)
    ]
    assert not lazy, lazy


def test_the_library_never_imports_the_top_level_configs():
    offenders = [
        module
        for module, path in modules().items()
        for names, _ in imports(path, module)
        if any(name == "configs" or name.startswith("configs.") for name in names)
    ]
    assert not offenders


@pytest.mark.slow
def test_the_converter_and_the_benchmarks_run_from_any_directory(tmp_path):
    """After ``pip install -e .``: nothing depends on the repository root being the cwd."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    commands = [
        [sys.executable, "-m", "alexnet_jax.convert", "--help"],
        [sys.executable, "-m", "alexnet_jax.plots", "--help"],
        [sys.executable, os.path.join(ROOT, "benchmarks", "compare_pytorch.py"), "--help"],
        [sys.executable, os.path.join(ROOT, "benchmarks", "input_pipeline.py"), "--help"],
        [sys.executable, os.path.join(ROOT, "benchmarks", "conv_layers.py"), "--help"],
    ]
    for command in commands:
        result = subprocess.run(
            command, cwd="/", env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, (command, result.stderr[-2000:])
        assert "usage:" in result.stdout


def test_metrics_write_tensorboard_events_without_importing_torch(tmp_path):
    """tensorboardX imports torch wherever it is installed (as here); a run writes its events
    without it, and a later ``import torch`` in the same process still works."""
    code = (
        "import os, sys; import numpy as np; from alexnet_jax import metrics;"
        f"w = metrics.MetricsWriter({str(tmp_path)!r}, enabled=True);"
        "w.write({'step': 2, 'epoch': 0.5, 'split': 'eval', 'loss': 1.5, 'top1': 0.25});"
        "w.write_images(2, {'eval/kernels': np.ones((8, 8, 3))}); w.close();"
        "assert 'torch' not in sys.modules, 'tensorboardX imported torch';"
        "import torch; print('torch', torch.ones(2).sum().item())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch 2.0" in result.stdout
    (events,) = os.listdir(tmp_path / "tensorboard")
    assert events.startswith("events.") and os.path.getsize(tmp_path / "tensorboard" / events)


def test_a_tensorboardx_that_needs_torch_to_import_is_imported_with_it(tmp_path):
    fake = tmp_path / "tensorboardX"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import torch\n\nclass SummaryWriter:\n    def __init__(self, logdir):\n"
        "        self.logdir = logdir\n"
    )
    code = (
        "import sys; from alexnet_jax import metrics;"
        "w = metrics.summary_writer('events'); assert type(w).__module__ == 'tensorboardX';"
        "assert 'torch' in sys.modules and sys.modules['torch'] is not None; print(w.logdir)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "events"


def test_the_readme_code_map_lists_every_module_in_dependency_order():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Code map")[1].split("\n## ")[0]
    listed = re.findall(r"^\| `(alexnet_jax/[\w/]+\.py)`", section, re.M)
    files = {module: os.path.relpath(path, ROOT) for module, path in modules().items()}
    assert sorted(listed) == sorted(files.values())
    position = {path: i for i, path in enumerate(listed)}
    late = [
        f"{files[module]} imports {files[dep]}, listed below it"
        for module, deps in dependency_graph().items()
        for dep in deps
        if position[files[dep]] > position[files[module]]
    ]
    assert not late, late
