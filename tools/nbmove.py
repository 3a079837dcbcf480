"""Move exported cells (with the prose before them and the tests after them) from one notebook to another.

    python tools/nbmove.py SRC.ipynb DST.ipynb NAME [NAME ...]     # cells that define any NAME
    python tools/nbmove.py SRC.ipynb DST.ipynb --ids ID [ID ...]    # cells by id
    python tools/nbmove.py --list SRC.ipynb                         # each exported cell's id and top-level names

A moved group is: the markdown cells right before the exported cell, the exported cell, and the plain (test/example)
cells after it up to the next markdown or exported cell. DST is created when missing, with a `#| default_exp` cell
(module from DST's path under nbs/) and a copy of SRC's first exported import cell, to prune by hand.
"""
import ast, json, re, sys, uuid
from pathlib import Path


def load(path): return json.loads(Path(path).read_text())


def save(nb, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def src(c): return "".join(c["source"])


def is_export(c): return c["cell_type"] == "code" and re.match(r"#\|\s*export", src(c))


def names(c) -> set:
    body = "\n".join(l for l in src(c).splitlines() if not l.startswith("#|"))
    try: tree = ast.parse(body)
    except SyntaxError: return set()
    out = set()
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): out.add(n.name)
        elif isinstance(n, (ast.Assign, ast.AnnAssign)):
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                for e in ast.walk(t):
                    if isinstance(e, ast.Name): out.add(e.id)
    return out


def groups(cells):
    "[(start, end)] index ranges of each exported cell's group."
    out = []
    for i, c in enumerate(cells):
        if not is_export(c): continue
        s = i
        while s > 0 and cells[s - 1]["cell_type"] == "markdown" and not any(s - 1 < e for _, e in out[-1:]): s -= 1
        e = i + 1
        while e < len(cells) and cells[e]["cell_type"] == "code" and not is_export(cells[e]): e += 1
        out.append((s, e))
    return out


def new_notebook(dst: Path, srcnb) -> dict:
    mod = ".".join(dst.relative_to(dst.parents[len(dst.parts) - 1 - dst.parts.index("nbs")]).with_suffix("").parts[1:])
    mod = ".".join(re.sub(r"^\d+[a-z]?_", "", p) for p in mod.split("."))
    imports = next((c for c in srcnb["cells"] if is_export(c) and re.search(r"^(from|import) ", src(c), re.M)), None)
    cell = lambda kind, text: {"cell_type": kind, "id": uuid.uuid4().hex[:8], "metadata": {}, "source": text.splitlines(True),
                               **({"execution_count": None, "outputs": []} if kind == "code" else {})}
    cells = [cell("markdown", f"# {mod}\n> TODO: one line on what this module holds."), cell("code", f"#| default_exp {mod}")]
    if imports: cells.append(cell("code", src(imports)))
    return {"cells": cells, "metadata": srcnb["metadata"], "nbformat": srcnb["nbformat"], "nbformat_minor": srcnb["nbformat_minor"]}


def main(argv):
    if argv[0] == "--list":
        for c in load(argv[1])["cells"]:
            if is_export(c): print(c.get("id"), " ".join(sorted(names(c))))
        return
    srcp, dstp, rest = Path(argv[0]), Path(argv[1]), argv[2:]
    by_id = rest[0] == "--ids"
    want = set(rest[1:] if by_id else rest)
    nb = load(srcp)
    cells = nb["cells"]
    take = [(s, e) for s, e in groups(cells)
            if (cells[next(i for i in range(s, e) if is_export(cells[i]))].get("id") in want if by_id
                else names(cells[next(i for i in range(s, e) if is_export(cells[i]))]) & want)]
    found = set()
    for s, e in take:
        c = next(cells[i] for i in range(s, e) if is_export(cells[i]))
        found |= {c.get("id")} if by_id else names(c) & want
    if missing := want - found: sys.exit(f"not found in {srcp}: {' '.join(sorted(missing))}")
    dst = load(dstp) if dstp.exists() else new_notebook(dstp.resolve(), nb)
    moved = [i for s, e in take for i in range(s, e)]
    dst["cells"] += [cells[i] for i in moved]
    nb["cells"] = [c for i, c in enumerate(cells) if i not in set(moved)]
    save(dst, dstp); save(nb, srcp)
    print(f"moved {len(moved)} cells ({len(take)} groups) {srcp} -> {dstp}")


if __name__ == "__main__": main(sys.argv[1:])
