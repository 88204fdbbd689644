"""The import graph, read from the source (imports inside functions included): imports point down
(common <- data_prep, model <- train, sample), no package imports itself in a circle, train and sample
use data_prep only through its door, the model knows nothing of runs, every command line maps errors
to exit codes one way, and no file calls another file's private functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "data_prep", "model", "train", "sample")
# what each package may import, besides itself
ALLOWED = {"common": set(), "data_prep": {"common"}, "model": {"common"},
           "train": {"common", "data_prep", "model"}, "sample": {"common", "data_prep", "model"}}
COMMANDS = ("data_prep/prepare.py", "data_prep/verify.py", "train/run.py", "sample/run.py", "sample/evaluate.py",
            "sample/demo.py")


def module_name(path: Path) -> str:
    """data_prep/reader.py -> data_prep.reader; data_prep/__init__.py -> data_prep."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).glob("*.py"))}
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in SOURCES.items()}


def imports_of(name: str) -> set[str]:
    """The project modules that module `name` imports anywhere in its file."""
    found = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import submodule` imports the submodule; `from package import name` the package
            found.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in SOURCES else node.module
                         for alias in node.names)
    return {module for module in found if module.split(".")[0] in PACKAGES}


GRAPH = {name: imports_of(name) for name in SOURCES}


def test_imports_point_down():
    wrong = [f"{name} imports {target}" for name, targets in GRAPH.items() for target in targets
             if target.split(".")[0] not in ALLOWED[name.split(".")[0]] | {name.split(".")[0]}]
    assert not wrong


def test_no_package_imports_itself_in_a_circle():
    def cycle_from(start: str, node: str, path: list[str]):
        for target in sorted(GRAPH.get(node, ())):
            if target == start:
                return path + [target]
            if target not in path and target.split(".")[0] == start.split(".")[0]:
                found = cycle_from(start, target, path + [target])
                if found:
                    return found
        return None

    circles = [" -> ".join(found) for name in GRAPH if (found := cycle_from(name, name, [name]))]
    assert not circles


def test_train_and_sample_use_data_prep_through_its_door_and_model_knows_nothing_of_runs():
    side_doors = [f"{name} imports {target}" for name, targets in GRAPH.items() if name.split(".")[0] in ("train", "sample")
                  for target in targets if target.startswith("data_prep.")]
    assert not side_doors
    assert not [name for name, targets in GRAPH.items() if name.startswith("model") and "common.run_layout" in targets]
    assert not [name for name in SOURCES if name.startswith("model.") and "run" in name.split(".")[1]]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_maps_errors_to_exit_codes_one_way(command):
    tree = TREES[module_name(REPO / command)]
    calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert "run_command" in calls


def test_no_file_calls_another_files_private_functions():
    defined = {name: {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.name.startswith("_") and not node.name.startswith("__")} for name, tree in TREES.items()}
    everywhere = set().union(*defined.values())
    private_calls = [f"{name}: {ast.unparse(node.func)}" for name, tree in TREES.items() for node in ast.walk(tree)
                     if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                     and node.func.attr in everywhere - defined[name]
                     and not (isinstance(node.func.value, ast.Name) and node.func.value.id in ("self", "cls"))]
    assert not private_calls


def test_the_run_layout_and_the_stored_model_name_the_same_config_file():
    from common import run_layout
    from model import pretrained

    assert run_layout.CONFIG_NAME == pretrained.CONFIG_NAME


def test_run_command_maps_usage_to_2_and_failures_to_1_in_one_line(capsys):
    from common.exits import Failure, UsageError, run_command

    assert run_command("p", lambda: 5) == (5, 0)
    for error, code in ((UsageError("bad flag"), 2), (Failure("corrupt file"), 1), (KeyError("k"), 2), (OSError("disk"), 1)):
        def work(error=error):
            raise error
        assert run_command("p", work, usage=(KeyError,), failure=(OSError,)) == (None, code)
        assert capsys.readouterr().err.count("\n") == 1
    assert run_command(None, work, failure=(OSError,))[1] == 1 and capsys.readouterr().err.startswith("error: disk")
