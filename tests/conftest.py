"""Shared pytest setup: every module in tests/fixtures/ is a fixture plugin
(one per area, so areas do not edit one file), but for wait.py: plain helpers the others import."""

from pathlib import Path

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}"
    for p in (Path(__file__).parent / "fixtures").glob("*.py")
    if p.stem not in ("__init__", "wait")
)
