"""Writes tests/golden/weighted_captions.json.gz from kohya-ss/sd-scripts' own code (commit 48d368f): the A1111 attention
parse (TokenizeStrategy._get_weighted_input_ids.parse_prompt_attention) and SdTokenizeStrategy.tokenize_with_weights
(ids and weights, SD1 and SD2 tokenizers, --max_token_length None/150/225).
Usage: python tools/golden_weighted_captions.py <sd-scripts git dir>   (e.g. /work/.mirror/kohya-ss+sd-scripts/repo)"""
import ast, gzip, json, subprocess, sys, tempfile, types
from pathlib import Path

from transformers import CLIPTokenizer

CAPTIONS = [
    "normal text", "an (important) word", "(unbalanced", r"\(literal\]", "(unnecessary)(parens)",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "", "sks dog, (red collar:1.5), [blurry], grass",
    "(a:-0.5) b (c:+2) [d:1.5] e:f", r"back\\slash \ lone", "[[x]] ((y)) [z", "tag, (two words:0.8), tag2",
    "(nested (inner:2) outer:0.5)", "photo of ) stray ] brackets",
    ", ".join(f"(tag{i}:1.{i % 10})" if i % 3 == 0 else f"tag{i}" for i in range(60)),   # > 150 tokens
]


def sd_scripts_modules(repo: str):
    "strategy_base / strategy_sd imported from `repo` with their logging and train_util imports stubbed."
    tmp = Path(tempfile.mkdtemp())
    for name in ("strategy_base", "strategy_sd"):
        src = subprocess.run(["git", "-C", repo, "show", f"HEAD:library/{name}.py"], capture_output=True, text=True, check=True).stdout
        (tmp / f"{name}.py").write_text(src)
    lib = types.ModuleType("library"); lib.__path__ = [str(tmp)]
    utils = types.ModuleType("library.utils"); utils.setup_logging = lambda *a, **k: None
    lib.train_util = types.ModuleType("library.train_util")
    sys.modules.update({"library": lib, "library.utils": utils, "library.train_util": lib.train_util})
    import library.strategy_base as base, library.strategy_sd as sd
    return base, sd


def parse_function(repo: str):
    "sd-scripts' nested parse_prompt_attention, extracted from _get_weighted_input_ids and run as it is."
    base, _ = sd_scripts_modules(repo)
    src = subprocess.run(["git", "-C", repo, "show", "HEAD:library/strategy_base.py"], capture_output=True, text=True, check=True).stdout
    fn = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name == "parse_prompt_attention")
    ns = {"TokenizeStrategy": base.TokenizeStrategy}
    exec(compile(ast.Module([fn], []), "strategy_base.py", "exec"), ns)
    return ns["parse_prompt_attention"]


def main(repo: str):
    _, sd = sd_scripts_modules(repo)
    parse = parse_function(repo)
    assets = Path(__file__).resolve().parents[1] / "lora_kit/assets/clip_tokenizer"
    toks = {"sd1": CLIPTokenizer.from_pretrained(assets, model_max_length=77),
            "sd2": CLIPTokenizer.from_pretrained(assets, model_max_length=77, pad_token="!")}
    out = {"parse": {c: parse(c) for c in CAPTIONS}, "tokens": []}
    for fam, tok in toks.items():
        for mtl in (None, 150, 225):
            strategy = object.__new__(sd.SdTokenizeStrategy)
            strategy.tokenizer, strategy.max_length = tok, 77 if mtl is None else mtl + 2
            for c in CAPTIONS:
                (ids,), (w,) = strategy.tokenize_with_weights(c)
                out["tokens"].append({"family": fam, "max_token_length": mtl, "caption": c,
                                      "ids": ids[0].tolist(), "weights": w[0].tolist()})
    dest = Path(__file__).resolve().parents[1] / "tests/golden/weighted_captions.json.gz"
    with gzip.open(dest, "wt", encoding="utf-8") as f: json.dump(out, f)
    print(dest, len(out["tokens"]))


if __name__ == "__main__":
    main(sys.argv[1])
