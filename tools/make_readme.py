"""Write README.md from nbs/index.ipynb (its markdown cells, in order).

`nbdev_readme` would also execute every notebook to render docs; the README needs only index's prose, so this is
the quick equivalent. tests/test_project.py fails when README.md is out of date.
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_text(nb_path=ROOT / "nbs" / "index.ipynb") -> str:
    cells = json.loads(Path(nb_path).read_text())["cells"]
    return "\n\n".join("".join(c["source"]).strip() for c in cells if c["cell_type"] == "markdown") + "\n"


if __name__ == "__main__":
    (ROOT / "README.md").write_text(readme_text())
    print("wrote README.md", file=sys.stderr)
