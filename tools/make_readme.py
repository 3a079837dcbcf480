"""Write README.md from nbs/index.ipynb (its markdown cells, in order).

`nbdev_readme` would also execute every notebook to render docs; the README needs only index's prose, so this is
the quick equivalent. The marker `<!-- unsupported-flags -->` in index becomes the list of sd-scripts flags lora_kit
does not support yet, generated from the option table. tests/test_project.py fails when README.md is out of date.
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


MARKER = "<!-- unsupported-flags -->"
TABLE = "<!-- notebook-table -->"
SUBFOLDERS = ("families", "compat", "runtime", "toy")   # after the top-level story, in this order


def notebooks(nbs=ROOT / "nbs") -> list[Path]:
    "Every notebook in reading order: the top-level story by name, then each sub-folder (its notebooks by name)."
    top = sorted(p for p in nbs.glob("*.ipynb") if p.stem not in ("index", "quickstart"))
    return top + [p for d in SUBFOLDERS for p in sorted((nbs / d).glob("*.ipynb"))]


def notebook_row(path: Path) -> str:
    "A table row: the notebook, its module (`#| default_exp`) and its one-line summary (the `> ` line of its title cell)."
    cells = json.loads(path.read_text())["cells"]
    text = lambda c: "".join(c["source"])
    module = next((text(c).split()[2] for c in cells if c["cell_type"] == "code" and text(c).startswith("#| default_exp")), "")
    title = next((text(c) for c in cells if c["cell_type"] == "markdown"), "")
    lines = title.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith("> ")), len(lines))
    summary = " ".join(l.strip().removeprefix(">").strip() for l in lines[start:]).strip()
    return f"| `{path.relative_to(ROOT / 'nbs').with_suffix('')}` | `{module}` | {summary} |"


def notebook_table() -> str:
    rows = [notebook_row(p) for p in notebooks()]
    return "\n".join(["| notebook | module | what it holds |", "|---|---|---|", *rows,
                      "| `quickstart` | — | open, Run All: teaches the toy model a star from the form, with a live loss plot, "
                      "sample gallery and before/after grid (Colab badge inside) |"])


def unsupported_markdown() -> str:
    "The sd-scripts train_network flags lora_kit refuses, as one markdown paragraph."
    sys.path.insert(0, str(ROOT))
    from lora_kit.config import unsupported_flags
    return ", ".join(f"`{f}`" for f in unsupported_flags("train_network"))


def readme_text(nb_path=ROOT / "nbs" / "index.ipynb") -> str:
    cells = json.loads(Path(nb_path).read_text())["cells"]
    text = "\n\n".join("".join(c["source"]).strip() for c in cells if c["cell_type"] == "markdown") + "\n"
    return text.replace(MARKER, unsupported_markdown()).replace(TABLE, notebook_table())


if __name__ == "__main__":
    (ROOT / "README.md").write_text(readme_text())
    print("wrote README.md", file=sys.stderr)
