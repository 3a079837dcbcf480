"""The notebooks as a static HTML site in _docs/ without Quarto: each notebook (with its kept outputs) through nbconvert,
and an index page listing them in reading order with their one-line summaries (the README's notebook table).

    python tools/docs_html.py            # then open _docs/index.html
"""
import html, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from make_readme import notebook_row, notebooks   # noqa: E402


def main(out: Path = ROOT / "_docs") -> Path:
    pages = [ROOT / "nbs" / "index.ipynb", *notebooks(), ROOT / "nbs" / "quickstart.ipynb"]
    rows = []
    for nb in pages:
        rel = nb.relative_to(ROOT / "nbs").with_suffix("")
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", "--log-level", "WARN", "--output",
                        str((out / rel).resolve()), str(nb)], check=True)
        cells = notebook_row(nb).strip("|").split("|") if nb.stem not in ("index", "quickstart") else [f"`{rel}`", "", nb.stem]
        rows.append(f'<tr><td><a href="{rel}.html">{html.escape(str(rel))}</a></td><td>{html.escape(cells[1].strip(" `"))}</td>'
                    f'<td>{html.escape(cells[2].strip())}</td></tr>')
    (out / "index.html").write_text("<!doctype html><meta charset='utf-8'><title>lora_kit</title>"
                                    "<h1>lora_kit: the notebooks, in reading order</h1><table>"
                                    "<tr><th>notebook</th><th>module</th><th>what it holds</th></tr>" + "".join(rows) + "</table>\n")
    return out / "index.html"


if __name__ == "__main__": print(f"documentation site: {main()}")
