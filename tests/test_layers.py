"""The package's layering: a module imports only from its own layer or those below it, and the stages never import
each other (runtime -> method -> models -> runs -> stage/loop -> pretrain, finetune -> command line)."""

from __future__ import annotations

import ast

from helpers import REPO

LAYERS = {"runtime": 0, "method": 1, "models": 2, "runs": 3, "stage": 4, "loop": 4, "pretrain": 5, "finetune": 5}  # anything else: top


def layer(module: list[str]) -> int:
    return LAYERS.get(module[1], 6) if len(module) > 1 else 6


def imports(path) -> list[list[str]]:
    """The codir_ds modules `path` imports (relative imports resolved), as dotted parts."""
    here = list(path.relative_to(REPO).with_suffix("").parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: -node.level] + (node.module.split(".") if node.module else [])
            found += [base + [alias.name] for alias in node.names] if not node.module else [base]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("codir_ds"):
            found.append(node.module.split("."))
    return found


def test_no_import_runs_back_up_and_stages_stay_apart():
    offences = []
    for path in sorted((REPO / "codir_ds").rglob("*.py")):
        module = list(path.relative_to(REPO).with_suffix("").parts)
        for target in imports(path):
            stages = {module[1], target[1] if len(target) > 1 else ""} == {"pretrain", "finetune"}
            upward = layer(target) > layer(module) and target[-1] != "__version__"
            if upward or stages:
                offences.append(f"{'.'.join(module)} imports {'.'.join(target)}")
    assert offences == []
    assert layer(["codir_ds", "runtime", "errors"]) < layer(["codir_ds", "method", "objective"]) < layer(["codir_ds", "stage"])
