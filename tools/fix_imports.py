"""Rewrite `from lora_kit.OLD import a, b` (and `from .OLD import`) lines after names moved to other modules.

    python tools/fix_imports.py OLD [OLD ...] -- PATH [PATH ...]

Each name is looked up in the modules of the current package (the first module that defines it at top level),
so run it after `nbdev_export`. Works on .py files and on the code cells of .ipynb notebooks.
"""
import ast, json, re, sys
from pathlib import Path

def definitions(pkg: Path) -> dict:
    "name -> dotted module for every top-level definition in the package."
    out = {}
    for f in sorted(pkg.rglob("*.py")):
        if f.name == "_modidx.py": continue
        mod = ".".join(f.relative_to(pkg.parent).with_suffix("").parts).removesuffix(".__init__")
        try: tree = ast.parse(f.read_text())
        except SyntaxError: continue
        for n in tree.body:
            names = []
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): names = [n.name]
            elif isinstance(n, (ast.Assign, ast.AnnAssign)):
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                    names += [e.id for e in ast.walk(t) if isinstance(e, ast.Name)]
            for x in names: out.setdefault(x, mod)
            out.setdefault(("in", mod), set()).update(names)
    return out

def rewrite(line: str, olds: set, defs: dict, relative_base: str|None) -> str:
    m = re.match(r"^(\s*)from (lora_kit|\.)\.?([\w.]+) import (.+?)(\s*#.*)?$", line.rstrip("\n"))
    if not m or m[3] not in olds: return line
    if m[4].startswith("(") and not m[4].rstrip().endswith(")"): raise SystemExit(f"a multi-line import: edit it by hand ({line.strip()})")
    indent, names = m[1], [n.strip() for n in m[4].strip("()").split(",") if n.strip()]
    groups = {}
    old = f"lora_kit.{m[3]}"
    for n in names:
        base = n.split(" as ")[0].strip()
        if base not in defs: raise SystemExit(f"cannot place {base!r} (in: {line.strip()})")
        groups.setdefault(old if base in defs.get(("in", old), ()) else defs[base], []).append(n)
    nl = "\n" if line.endswith("\n") else ""
    out = []
    for mod, ns in sorted(groups.items()):
        src = mod if m[2] == "lora_kit" else "." + mod.removeprefix("lora_kit.") if relative_base is None else mod
        if m[2] == ".": src = _relative(mod, relative_base)
        out.append(f"{indent}from {src} import {', '.join(ns)}")
    return "\n".join(out) + nl

def _relative(mod: str, base: str) -> str:
    "`mod` relative to the package of module `base` (both dotted)."
    a, b = mod.split("."), base.split(".")[:-1]
    i = 0
    while i < min(len(a) - 1, len(b)) and a[i] == b[i]: i += 1
    return "." * (len(b) - i + 1) + ".".join(a[i:])

def main(argv):
    k = argv.index("--")
    olds, paths = set(argv[:k]), [Path(p) for p in argv[k + 1:]]
    defs = definitions(Path("lora_kit"))
    files = [f for p in paths for f in ([p] if p.is_file() else [*p.rglob("*.py"), *p.rglob("*.ipynb")])]
    for f in files:
        if f.name == "_modidx.py" or ".ipynb_checkpoints" in f.parts: continue
        base = ".".join(f.with_suffix("").parts) if f.suffix == ".py" and f.parts[0] == "lora_kit" else None
        if f.suffix == ".ipynb":
            nb = json.loads(f.read_text()); changed = False
            for c in nb["cells"]:
                if c["cell_type"] != "code": continue
                new = [rewrite(l, olds, defs, None) for l in c["source"]]
                if new != c["source"]:
                    c["source"] = "".join(new).splitlines(True); changed = True
            if changed: f.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n"); print("fixed", f)
        else:
            lines = f.read_text().splitlines(True)
            new = [rewrite(l, olds, defs, base) for l in lines]
            if new != lines: f.write_text("".join(new)); print("fixed", f)

if __name__ == "__main__": main(sys.argv[1:])
