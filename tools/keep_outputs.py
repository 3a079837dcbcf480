"""Run notebooks and keep the outputs of the cells marked `#| keep_output` (a bucket table, a loss curve, a sample grid),
so a reader sees what the code does; every other cell stays without output (tests/test_project.py checks both).

    python tools/keep_outputs.py nbs/01a_buckets.ipynb [more notebooks]

Run it after changing a marked cell; nbdev_clean keeps the outputs (clear_all = False) and strips the run's metadata.
"""
import json, os, sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell

KEEP = "#| keep_output"


def keeps(cell) -> bool: return cell.cell_type == "code" and cell.source.lstrip().startswith(KEEP)


def run(path: Path):
    nb = read_nb(path)
    if not any(keeps(c) for c in nb.cells): return print(f"{path}: no {KEEP} cell")
    cwd = os.getcwd(); os.chdir(path.parent)          # as nbdev_test runs a notebook: from its folder
    try: CaptureShell().run_all(nb, exc_stop=True, preproc=lambda c: c.source.lstrip().startswith(("#| eval: false", "#| slow", "#| gpu")))
    finally: os.chdir(cwd)
    for c in nb.cells:
        if c.cell_type != "code": continue
        c.execution_count = None
        if not keeps(c): c.outputs = []
        else:
            for o in c.outputs:
                if "execution_count" in o: o["execution_count"] = None
    write_nb(nb, path)
    print(f"{path}: outputs kept in {sum(keeps(c) for c in nb.cells)} cell(s)")


if __name__ == "__main__":
    for p in sys.argv[1:]: run(Path(p))
