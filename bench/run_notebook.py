"""Run the notebook's code cells in this Python process, without Jupyter.

For machines that have the project's runtime packages but no Jupyter kernel (such as a lent GPU
box): the same cells, in order, in one namespace, with parameter overrides applied right after the
cell tagged ``parameters`` (papermill's convention). The notebook holds no IPython magics, so its
cells are plain Python. Users with Jupyter use papermill instead (see the README).

    python bench/run_notebook.py dyt_cifar10.ipynb -p epochs 2 -p train_subset 1000
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path


def parse_value(text: str):
    """A Python literal (numbers, True/False/None, quoted strings), else the text as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run(notebook: Path, overrides: dict) -> dict:
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in cells):
        raise SystemExit(f"{notebook} has no cell tagged 'parameters'")
    namespace: dict = {"__name__": "__main__"}
    sys.path.insert(0, str(notebook.resolve().parent))
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        start = time.perf_counter()
        print(f"--- cell {i}", flush=True)
        exec(compile(source, f"{notebook.name}[code cell {i}]", "exec"), namespace)
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            unknown = sorted(set(overrides) - set(namespace))
            if unknown:
                raise SystemExit(f"not parameters of {notebook.name}: {', '.join(unknown)}")
            namespace.update(overrides)
            print("--- parameters: " + ", ".join(f"{k}={v!r}" for k, v in overrides.items()), flush=True)
        print(f"--- cell {i} took {time.perf_counter() - start:.1f}s", flush=True)
    return namespace


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebook", type=Path)
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    args = ap.parse_args(argv)
    run(args.notebook, {name: parse_value(value) for name, value in args.p})


if __name__ == "__main__":
    main()
