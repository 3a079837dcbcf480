"Property-based: any command line or dataset TOML ends in a clear error or a valid config, never a traceback."
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st
from PIL import Image

from lora_kit.config import OPTIONS, ConfigError, make_config
from lora_kit.compat.dataset_config import DatasetError
from lora_kit.data import load_datasets

names = st.sampled_from(sorted(OPTIONS)) | st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=20)
values = st.one_of(st.text(max_size=12), st.integers(-5, 5000).map(str), st.floats(allow_nan=True).map(str),
                   st.sampled_from(["true", "false", "networks.lora", "tiny-sd1", "AdamW", "cosine", "bf16", "64", "1e-4", ""]))
flag = st.tuples(names, st.lists(values, max_size=3), st.booleans()).map(
    lambda t: [f"--{t[0]}={t[1][0]}"] if t[2] and t[1] else [f"--{t[0]}", *t[1]])
argvs = st.lists(flag, max_size=8).map(lambda fs: [tok for f in fs for tok in f]) | st.lists(st.text(max_size=10), max_size=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argvs)
def test_any_argv_is_clear_error_or_config(argv):
    try: make_config(argv)
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)


printable = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=8)   # what a TOML string can hold
scalars = st.one_of(st.integers(-3, 3000), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                    printable, st.lists(st.integers(0, 2000), max_size=3))
keys = st.sampled_from(["resolution", "batch_size", "image_dir", "num_repeats", "caption_extension", "class_tokens",
                        "is_reg", "shuffle_caption", "keep_tokens", "enable_bucket", "flip_aug", "bogus_key", "subsets"])
tables = st.dictionaries(keys, scalars, max_size=5)
configs = st.fixed_dictionaries({}, optional={"general": tables,
                                              "datasets": st.lists(tables.map(lambda d: {**d, "subsets": [d]}) | tables, max_size=2),
                                              "junk": scalars})


def _toml(d, prefix=""):
    "A TOML text for the nested dict/list structure hypothesis generates (inline tables keep it simple)."
    import json
    def val(v):
        if isinstance(v, bool): return "true" if v else "false"
        if isinstance(v, (int, float)): return repr(v)
        if isinstance(v, str): return json.dumps(v, ensure_ascii=False)
        if isinstance(v, list): return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict): return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + "}"
    return "\n".join(f"{k} = {val(v)}" for k, v in d.items()) + "\n"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(configs)
def test_any_dataset_toml_is_clear_error_or_datasets(tmp_path, data):
    p = tmp_path / "ds.toml"
    p.write_text(_toml(data))
    tomllib.loads(p.read_text())          # the generator writes valid TOML; the content is what is random
    cfg = make_config(["--pretrained_model_name_or_path", "tiny-sd1", "--network_module", "networks.lora",
                       "--dataset_config", str(p), "--output_dir", str(tmp_path)])
    try: load_datasets(cfg)
    except DatasetError as e:
        assert e.problems and all(isinstance(m, str) and m for m in e.problems)


# Bucket settings over the ranges published configs carry: kohya_ss writes resolution "1024,1024", numbers as floats
# (bucket_reso_steps 64.0) or strings (max_bucket_reso "1024"), steps from 1 to 128; hand-edited files hold 0 and
# values below bucket_reso_steps. Each goes on the command line, in a --config_file or in a dataset TOML's [general].
def _forms(ints):
    "An integer as configs write it: mostly itself, else as a float or a string."
    return ints | ints | ints | ints.map(float) | ints.map(str)


def _common(values, lo, hi):
    "The values configs usually hold, or any integer in [lo, hi]."
    return st.sampled_from(values) | st.integers(lo, hi)


sides = _common([64, 512, 768, 1024], -64, 4096)
bucket_options = st.fixed_dictionaries({
    "resolution": _forms(sides) | st.tuples(sides, sides).map(lambda t: f"{t[0]},{t[1]}") | st.lists(sides, min_size=2, max_size=2)}, optional={
    "enable_bucket": st.booleans(),
    "bucket_no_upscale": st.booleans(),
    "min_bucket_reso": _forms(_common([0, 32, 64, 256, 320], -64, 2048)),
    "max_bucket_reso": _forms(_common([1024, 1280, 2048], -64, 8192)),
    "bucket_reso_steps": _forms(_common([1, 8, 32, 64, 128], -8, 300)),
})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    "A DreamBooth folder with a landscape, a portrait, a tiny and a thin image."
    d = tmp_path_factory.mktemp("buckets") / "2_sks"
    d.mkdir()
    for i, size in enumerate([(600, 400), (300, 500), (70, 70), (70, 900)]):
        Image.new("RGB", size, (i * 60, 0, 0)).save(d / f"{i}.png"); (d / f"{i}.txt").write_text("sks")
    return d


def _bucket_argv(route, options, d, tmp):
    "The command line that gives `options` by `route` (argv flags, --config_file, dataset TOML)."
    argv = ["--pretrained_model_name_or_path", "tiny-sd1", "--network_module", "networks.lora", "--caption_extension", ".txt",
            "--output_dir", str(tmp)]
    if route == "argv":
        flags = [[f"--{k}"] if v is True else [] if v is False else [f"--{k}", str(v)] for k, v in options.items()]
        return argv + ["--train_data_dir", str(d.parent)] + [t for f in flags for t in f]
    (tmp / "opts.toml").write_text(_toml(options))
    if route == "config_file": return argv + ["--train_data_dir", str(d.parent), "--config_file", str(tmp / "opts.toml")]
    (tmp / "ds.toml").write_text("[general]\n" + (tmp / "opts.toml").read_text() + f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{d}"\n')
    return argv + ["--dataset_config", str(tmp / "ds.toml")]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["argv", "config_file", "dataset"]), bucket_options)
@example("argv", {"resolution": 64, "min_bucket_reso": 0, "bucket_reso_steps": 32, "enable_bucket": True, "max_bucket_reso": 1024,
                  "bucket_no_upscale": True})     # found by this test: the 70x900 image shrinks to ~18x230 (was a ZeroDivisionError)
def test_bucket_settings_plan_or_clear_error(images, tmp_path, route, options):
    try: datasets = load_datasets(make_config(_bucket_argv(route, options, images, tmp_path)))[0]
    except (ConfigError, DatasetError) as e:
        assert e.problems and all(isinstance(m, str) and m for m in e.problems); return
    for d in datasets:
        spec, plan = d.plan.spec, d.plan.plan
        for c in plan.choices:       # every image can be resized and cropped to its bucket
            assert min(c.reso) >= 1 and c.resized_size[0] >= c.reso[0] and c.resized_size[1] >= c.reso[1], (options, c)
            if spec.enable_bucket: assert c.reso[0] % spec.bucket_reso_steps == 0 == c.reso[1] % spec.bucket_reso_steps
            else: assert c.reso == tuple(spec.resolution)
