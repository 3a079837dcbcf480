"""Write README.md from nbs/index.ipynb (its markdown cells, in order).

`nbdev_readme` would also execute every notebook to render docs; the README needs only index's prose, so this is
the quick equivalent. The marker `<!-- unsupported-flags -->` in index becomes the list of sd-scripts flags lora_kit
does not support yet, generated from the option table. tests/test_project.py fails when README.md is out of date.
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


MARKER = "<!-- unsupported-flags -->"


def unsupported_markdown() -> str:
    "The sd-scripts train_network flags lora_kit refuses, as one markdown paragraph."
    sys.path.insert(0, str(ROOT))
    from lora_kit.config import unsupported_flags
    return ", ".join(f"`{f}`" for f in unsupported_flags("train_network"))


def readme_text(nb_path=ROOT / "nbs" / "index.ipynb") -> str:
    cells = json.loads(Path(nb_path).read_text())["cells"]
    text = "\n\n".join("".join(c["source"]).strip() for c in cells if c["cell_type"] == "markdown") + "\n"
    return text.replace(MARKER, unsupported_markdown())


if __name__ == "__main__":
    (ROOT / "README.md").write_text(readme_text())
    print("wrote README.md", file=sys.stderr)
