"""The repo's shape: a framework-free core, and a tree clean under its linter and formatter."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, repo_python_files, write_dataset

# What needs no OneFlow: tools/torch_reference.py runs these under PyTorch, and plot.py and evaluate.py start fast.
CORE = [
    "isbi_unet.errors",
    "isbi_unet.flags",
    "isbi_unet.images",
    "isbi_unet.dataset",
    "isbi_unet.augment",
    "isbi_unet.tiling",
    "isbi_unet.metrics",
    "isbi_unet.figures",
    "isbi_unet.process.runtime",
    "isbi_unet.process.interrupt",
    "isbi_unet.process.watchdog",
    "isbi_unet.launch",
    "isbi_unet.outputs",
    "isbi_unet.predictor",
    "isbi_unet.bioimageio",
    "isbi_unet.onnx_backend",
]
BLOCK_ONEFLOW = "import sys; sys.modules['oneflow'] = None"  # any `import oneflow` now raises ImportError


def python(code, *args):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, capture_output=True, text=True)


def test_the_core_imports_with_oneflow_unimportable():
    code = f"{BLOCK_ONEFLOW}; import importlib; [importlib.import_module(m) for m in sys.argv[1:]]"
    proc = python(code, *CORE)
    assert proc.returncode == 0, proc.stderr
    # and the check is real: a OneFlow module fails under the same block
    assert "import of oneflow halted" in python(f"{BLOCK_ONEFLOW}; import isbi_unet.engine").stderr


@pytest.mark.parametrize("script", ["plot.py", "evaluate.py"])
def test_scripts_on_the_core_run_without_oneflow(tmp_path, script):
    data = write_dataset(str(tmp_path / "data"), n_train=2, n_test=0)
    argv = {
        "plot.py": ["--log", tmp_path / "log.csv", "--out", tmp_path / "loss.png"],
        "evaluate.py": ["--prob_dir", f"{data}/train/label", "--label_dir", f"{data}/train/label"],
    }[script]
    (tmp_path / "log.csv").write_text("epoch,train_loss\n1,0.5\n2,0.4\n")
    code = f"{BLOCK_ONEFLOW}; import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    proc = python(code, script, *argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_no_module_stubs_oneflow():
    offenders = []
    for folder, _, files in os.walk(REPO):
        if ".venv" in folder or ".git" in folder:
            continue
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and path != os.path.abspath(__file__):
                with open(path) as f:
                    if 'modules["oneflow"]' in f.read():
                        offenders.append(os.path.relpath(path, REPO))
    assert offenders == []


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_the_tree_is_clean_under_ruff(command):
    proc = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_library_never_imports_a_top_level_script():
    scripts = {os.path.splitext(n)[0] for n in os.listdir(REPO) if n.endswith(".py")}
    pattern = re.compile(r"^\s*(?:from|import)\s+(\w+)", re.M)
    offenders = []
    for name in sorted(os.listdir(os.path.join(REPO, "isbi_unet"))):
        if name.endswith(".py"):
            with open(os.path.join(REPO, "isbi_unet", name)) as f:
                offenders += [f"isbi_unet/{name}: {m}" for m in pattern.findall(f.read()) if m in scripts]
    assert offenders == [] and {"unet", "dataloader", "TrainUnetDataSet"} <= scripts


def imports_of(path, package="isbi_unet"):
    """Every module of the repo that `path` imports, at the top or inside a function."""
    import ast

    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module.startswith(package):  # `from isbi_unet import runtime`, `from isbi_unet.process import x`
                found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def package_modules():
    """{module name: file} for every module of the package, sub-packages included."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(REPO, "isbi_unet")):
        package = os.path.relpath(folder, REPO).replace(os.sep, ".")
        for name in files:
            if name.endswith(".py"):
                module = package if name == "__init__.py" else f"{package}.{name[:-3]}"
                modules[module] = os.path.join(folder, name)
    return modules


def package_graph():
    modules = package_modules()
    return {m: sorted(imports_of(p) & set(modules)) for m, p in modules.items()}


def find_cycle(graph):
    """One import circle of `graph` as a list of modules, or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                return path[path.index(n) :] + [n]
            if n not in state:
                cycle = visit(n, path + [n])
                if cycle:
                    return cycle
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m, [m])
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_circle():
    assert find_cycle(package_graph()) is None
    # and the check is real: a circle through a function-level import is found
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]


def test_the_shared_facts_module_imports_nothing_of_the_repo():
    assert package_graph()["isbi_unet.formats"] == []


def test_scripts_import_no_other_script_but_the_articles_classes():
    scripts = {n[:-3] for n in os.listdir(REPO) if n.endswith(".py")}
    allowed = {"unet", "dataloader"}  # the article's `from unet import UNet`, `from dataloader import SelfDataSet`
    offenders = [
        f"{name}.py imports {other}"
        for name in sorted(scripts)
        for other in sorted(imports_of(os.path.join(REPO, f"{name}.py")) & scripts)
        if other not in allowed and other != name
    ]
    assert offenders == []


# Process life (who am I, exit codes, joining the job, signals, the stall watchdog, the launcher) behind one door.
PLUMBING = [
    "isbi_unet.process",
    "isbi_unet.process.runtime",
    "isbi_unet.process.interrupt",
    "isbi_unet.process.watchdog",
    "isbi_unet.launch",
]
PLUMBING_FILES = [
    "isbi_unet/process/runtime.py",
    "isbi_unet/process/interrupt.py",
    "isbi_unet/process/watchdog.py",
    "isbi_unet/process/launch.py",
]


def is_plumbing(module):
    return module in PLUMBING or module.startswith("isbi_unet.process.")


def test_the_process_plumbing_imports_nothing_else_of_the_repo():
    graph = package_graph()
    plumbing = [m for m in graph if is_plumbing(m)]
    assert "isbi_unet.process" in plumbing and len(plumbing) >= 5
    outside = {m: [n for n in graph[m] if not is_plumbing(n) and n != "isbi_unet"] for m in plumbing}
    assert outside == {m: [] for m in plumbing}  # isbi_unet itself: its __init__.py, a docstring


def test_signal_handlers_are_installed_in_the_plumbing_only():
    pattern = re.compile(r"signal\.(signal|set_wakeup_fd|pthread_sigmask)\(")
    offenders = []
    for path in repo_python_files():
        if path not in PLUMBING_FILES and not path.startswith("isbi_unet/process/"):
            with open(os.path.join(REPO, path)) as f:
                offenders += [path] if pattern.search(f.read()) else []
    assert offenders == []


def test_no_code_runs_before_a_scripts_imports_but_one_guarded_line():
    """At most one statement, under `if __name__ == "__main__":`, stands between a script's imports."""
    import ast

    for name in sorted(n for n in os.listdir(REPO) if n.endswith(".py")):
        with open(os.path.join(REPO, name)) as f:
            body = ast.parse(f.read()).body
        last_import = max(
            (i for i, node in enumerate(body) if isinstance(node, (ast.Import, ast.ImportFrom))), default=0
        )
        before = [node for node in body[:last_import] if not isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr))]
        assert all(isinstance(node, ast.If) and len(node.body) == 1 for node in before), name
        assert len(before) <= 1, name
