"""Import a script of benchmarks/ as a module, for the tests of its functions (benchmarks/ is a folder of
scripts, not a package; not a test module)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    """benchmarks/<name>.py, imported fresh (its module-level code runs; its main() does not)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
