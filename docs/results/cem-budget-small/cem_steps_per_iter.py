"""Diagnostic (README, "Does a larger budget settle CEM's search?"): the main job's CEM with another
``steps_per_iter`` (requests per candidate and iteration) at the same budget.

Usage: ``python docs/results/cem-budget-small/cem_steps_per_iter.py 50 --only-cem --train-seed 2 --out runs/x``
(the arguments after the first are ``scripts/main.py``'s).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import tyro

MAIN = Path(__file__).resolve().parents[3] / "scripts" / "main.py"


def run(steps_per_iter: int, argv: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("main_script", MAIN)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load {MAIN}")
    main = importlib.util.module_from_spec(spec)
    sys.modules["main_script"] = main
    spec.loader.exec_module(main)
    main.cem_tune = functools.partial(main.cem_tune, steps_per_iter=steps_per_iter)
    main.main(tyro.cli(main.Args, args=argv))


if __name__ == "__main__":
    run(int(sys.argv[1]), sys.argv[2:])
