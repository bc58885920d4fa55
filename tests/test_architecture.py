"""The simulator is a plug-in the product never imports: only the simulator itself (xenblk/sim/) and
the CLI composition points, which choose real Xen or the sim host and hand it down (xenblk/cli.py,
xenblk/demo.py, xenblk/commands/*.py), may import xenblk.sim, at the top of a module or inside a
function alike."""

from __future__ import annotations

import ast
from pathlib import Path

import xenblk

PACKAGE = Path(xenblk.__file__).parent
ALLOWED = ("sim/", "commands/", "cli.py", "demo.py")


def _imported(tree: ast.AST, module: str) -> list[str]:
    """Every module an import statement in `tree` names (relative ones resolved against `module`)."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            names.append(prefix)
            names.extend(f"{prefix}.{a.name}" for a in node.names)  # `from xenblk import sim`
    return names


def _module(path: Path) -> str:
    parts = ["xenblk", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_only_the_simulator_and_the_cli_import_the_simulator() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(ALLOWED):
            continue
        for name in _imported(ast.parse(path.read_text(), str(path)), _module(path)):
            if name == "xenblk.sim" or name.startswith("xenblk.sim."):
                offenders.append(f"{rel} imports {name}")
    assert offenders == []


def test_the_rule_sees_imports_inside_functions() -> None:
    tree = ast.parse("def f():\n    from xenblk.sim.broker import BrokerClient\n    from .sim import host\n")
    assert "xenblk.sim.broker" in _imported(tree, "xenblk.xenplatform")
    assert "xenblk.sim" in _imported(tree, "xenblk.xenplatform")
