"Property-based: any command line or dataset TOML ends in a clear error or a valid config, never a traceback."
import tomllib
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from lora_kit.config import OPTIONS, ConfigError, make_config
from lora_kit.data import DatasetError, load_datasets

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
