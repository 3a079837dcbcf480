"""Add sdxl_train_network / flux_train_network to lora_kit's option table, from sd-scripts' own argument functions
(their source executed on a plain ArgumentParser; the scripts' imports need a GPU stack this machine lacks)."""
import argparse, ast, json, sys
# usage: python tools/sd_scripts_options.py lora_kit/assets/sd_scripts_options.json PATH_TO_SD_SCRIPTS
SD = sys.argv[2] if len(sys.argv) > 2 else "sd-scripts"   # a checkout of kohya-ss/sd-scripts@48d368fa
def run_fn(path, name, parser, extra=""):
    tree = ast.parse(open(f"{SD}/{path}").read())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    src = ast.get_source_segment(open(f"{SD}/{path}").read(), fn)
    ns = {"argparse": argparse}
    exec(extra + "\n" + src, ns)
    ns[name](parser)
def flux_split(parser):
    tree = ast.parse(open(f"{SD}/flux_train_network.py").read())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "setup_parser")
    for st in fn.body:
        if isinstance(st, ast.Expr) and isinstance(st.value, ast.Call) and getattr(st.value.func, "attr", "") == "add_argument":
            exec(compile(ast.Expression(st.value), "x", "eval"), {"parser": parser})
def actions(parser):
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
def entry(a):
    d = a.default
    try: json.dumps(d)
    except TypeError: d = str(d)
    typ = getattr(a.type, "__name__", None) if a.type else None
    kind = {"_StoreTrueAction": "StoreTrue", "_StoreAction": "Store", "_StoreFalseAction": "StoreFalse"}.get(type(a).__name__, type(a).__name__)
    return {"flag": max(a.option_strings, key=len), "action": kind, "type": typ, "default": d,
            "choices": list(a.choices) if a.choices else None, "nargs": a.nargs, "help": a.help or "", "scripts": []}
path = sys.argv[1]
table = json.load(open(path))
opts = table["options"]
base = [n for n, o in opts.items() if "train_network" in o["scripts"]]
p = argparse.ArgumentParser(); run_fn("library/sdxl_train_util.py", "add_sdxl_training_arguments", p)
sdxl = base + list(actions(p))
p = argparse.ArgumentParser(); run_fn("library/train_util.py", "add_dit_training_arguments", p); run_fn("library/flux_train_utils.py", "add_flux_train_arguments", p); flux_split(p)
fa = actions(p)
flux = base + list(fa)
for n, a in fa.items():
    if n not in opts: opts[n] = entry(a)
for script, names in (("sdxl_train_network", sdxl), ("flux_train_network", flux)):
    for n in names:
        if script not in opts[n]["scripts"]: opts[n]["scripts"].append(script)
table["source"] = "kohya-ss/sd-scripts@48d368fa (setup_parser of train_network.py, sd3_train_network.py, sdxl_train_network.py, flux_train_network.py)"
json.dump(table, open(path, "w"), indent=1)
print("new options:", [n for n in fa if "sd3_train_network" not in opts[n]["scripts"]])
