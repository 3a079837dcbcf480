"The notebooks are the source: lora_kit/ and README.md must be what they generate, and notebooks must be clean."
import json, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_package_matches_notebooks(tmp_path):
    shutil.copytree(ROOT / "nbs", tmp_path / "nbs")
    shutil.copy(ROOT / "settings.ini", tmp_path)
    (tmp_path / "lora_kit").mkdir()
    subprocess.run([sys.executable, "-c", "from nbdev.doclinks import nbdev_export; nbdev_export()"], cwd=tmp_path, check=True)
    generated = {p.relative_to(tmp_path / "lora_kit") for p in (tmp_path / "lora_kit").rglob("*.py")}
    committed = {p.relative_to(ROOT / "lora_kit") for p in (ROOT / "lora_kit").rglob("*.py")}
    assert generated == committed, f"modules differ: {sorted(map(str, generated ^ committed))}; run nbdev_export"
    stale = [str(p) for p in generated if (tmp_path / "lora_kit" / p).read_text() != (ROOT / "lora_kit" / p).read_text()]
    assert not stale, f"lora_kit/ is out of date with nbs/ in {stale}: run nbdev_export"


def test_readme_matches_index():
    sys.path.insert(0, str(ROOT / "tools"))
    from make_readme import readme_text
    assert (ROOT / "README.md").read_text() == readme_text(), "README.md is out of date: run python tools/make_readme.py"


def test_notebooks_are_clean():
    for nb in (ROOT / "nbs").rglob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        kept = lambda c: "".join(c["source"]).lstrip().startswith("#| keep_output")    # tools/keep_outputs.py
        dirty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c.get("execution_count") or (c.get("outputs") and not kept(c)))]
        assert not dirty, f"{nb.name} has outputs in cells {dirty}: run nbdev_clean"
        empty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and kept(c) and not c.get("outputs")]
        assert not empty, f"{nb.name}: cells {empty} should keep their output: run python tools/keep_outputs.py {nb.relative_to(ROOT)}"


def test_first_import_prints_nothing():
    "Whichever lora_kit module a notebook imports first, diffusers' and bitsandbytes' import-time notices stay off the screen."
    for module in ("lora_kit.family", "lora_kit.families.flux", "lora_kit.form"):
        r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), f"import {module} printed: {(r.stdout + r.stderr)[:500]}"
