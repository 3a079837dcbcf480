"""lora_kit's dataset rules against sd-scripts' own code: golden values in tests/golden/ were computed by running
kohya-ss/sd-scripts (commit 48d368f) functions (ConfigSanitizer/BlueprintGenerator, make_bucket_resolutions,
BucketManager, trim_and_resize_if_required with OpenCV 4.10, process_caption, _get_input_ids/encode_tokens,
DreamBoothDataset/FineTuningDataset on a generated file tree) with their pinned dependencies."""
import gzip, json, math, os, random, tomllib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image
from transformers import CLIPTokenizer

from lora_kit import buckets as B, captions as C
from lora_kit.compat import dataset_config as D, dataset_schema as S, registration as R
from lora_kit.runtime.scan import scan_dataset
from lora_kit.config import ASSETS

torch.set_num_threads(1)
GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def golden(name):
    with gzip.open(os.path.join(GOLDEN, name + ".gz"), "rt", encoding="utf-8") as f:
        return json.load(f)

# ----------------------------------------------------------------------------------------------------
# config





def _norm(v):
    if isinstance(v, tuple):
        return [_norm(x) for x in v]
    if isinstance(v, list):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def _expected_subset(p):
    p = dict(p)
    if "caption_extension" in p:
        p["caption_extension"] = D.normalize_caption_extension(p["caption_extension"])
    return p


CASES = golden("config_cases.json")
# sd-scripts' config validation accepts an unknown resize_interpolation but its dataset constructor then asserts:
# we reject it while validating (tested in test_dataset_construction_checks).
VALID = [c for c in CASES if "ok" in c["result"] and c["name"] != "bad_resize_interp_value"]
INVALID = [c for c in CASES if "error" in c["result"]]


@pytest.mark.parametrize("case", VALID, ids=[c["name"] for c in VALID])
def test_resolution_matches_sd_scripts_blueprint(case):
    specs = D.load_dataset_config(case["config"], case["cli"], warn=lambda m: None) if case["name"] not in (
        "empty", "only_general", "no_subsets", "no_subsets_masked", "subsets_empty_list") else None
    if specs is None:  # configs sd-scripts accepts but that have no resolution: check resolution step only
        cli = D.normalize_cli(case["cli"])
        sanitized, problems, _ = S.validate_user_config(case["config"], masked_loss=bool(cli.get("masked_loss")))
        assert problems == []
        specs = D.resolve_config(sanitized, cli)
    exp = case["result"]["ok"]
    assert len(specs) == len(exp)
    for spec, e in zip(specs, exp):
        assert (spec.kind == S.CN) == e["is_controlnet"]
        assert (spec.kind in (S.DB, S.CN)) == e["is_dreambooth"] or spec.kind == S.CN
        assert _norm(spec.sdscripts_params()) == e["params"]
        assert [_norm(s.sdscripts_params()) for s in spec.subsets] == [_expected_subset(s) for s in e["subsets"]]


@pytest.mark.parametrize("case", INVALID, ids=[c["name"] for c in INVALID])
def test_rejected_like_sd_scripts_and_key_named(case):
    with pytest.raises(D.DatasetError) as ei:
        D.load_dataset_config(case["config"], {"resolution": "512", **case["cli"]}, warn=lambda m: None)
    msg = str(ei.value)
    # every voluptuous error names a key path data[...]['key']: our message must name that key too
    for err in case["result"]["all_errors"] or [case["result"]["error"]]:
        if "@ data" in err:
            key = err.rsplit("[", 1)[1].strip("'] ")
            if key.isdigit():  # a whole dataset: data['datasets'][0]
                assert f"[[datasets]] #{int(key) + 1}" in msg, msg
            else:
                assert f"`{key}`" in msg, (key, msg)


def test_all_problems_at_once_with_locations_and_suggestions():
    cfg = {"general": {"shuffle_captions": True, "keep_tokens": "2"},
           "datasets": [{"batchsize": 2, "subsets": [{"image_dir": "a", "flip_aug": 1}, {"imagedir": "b", "batch_size": 3}]}]}
    with pytest.raises(D.DatasetError) as ei:
        D.load_dataset_config(cfg, {"resolution": "512"})
    p = ei.value.problems
    assert "[general]: unknown key `shuffle_captions`; did you mean `shuffle_caption`?" in p
    assert "[general]: `keep_tokens` must be an integer, got str '2'" in p
    assert "[[datasets]] #1: unknown key `batchsize`; did you mean `batch_size`?" in p
    assert "[[datasets.subsets]] #1 of dataset #1: `flip_aug` must be true or false, got int 1" in p
    assert "[[datasets.subsets]] #2 of dataset #1: unknown key `imagedir`; did you mean `image_dir`?" in p
    assert any(x.startswith("[[datasets.subsets]] #2 of dataset #1: `batch_size` is a dataset option") and "[[datasets]] #1" in x for x in p)
    assert "[[datasets.subsets]] #2 of dataset #1: missing required key `image_dir` (DreamBooth-style (image_dir with caption files / class_tokens) subset)" in p
    assert len(p) == 7


def test_misplaced_and_kind_messages():
    def problems(cfg, **cli):
        with pytest.raises(D.DatasetError) as ei:
            D.load_dataset_config(cfg, {"resolution": "512", **cli})
        return ei.value.problems
    p = problems({"general": {"image_dir": "x"}})
    assert p == ["[general]: `image_dir` is not allowed here; it can only be set per subset, in [[datasets.subsets]]"]
    p = problems({"datasets": [{"subsets": [{"metadata_file": "m.json", "class_tokens": "x"}]}]})
    assert "only applies to DreamBooth-style" in p[0] and "fine-tuning (metadata_file)" in p[0] and "`class_tokens`" in p[0]
    p = problems({"general": {"prior_loss_weight": 0.5}})
    assert "only takes it from the command line (--prior_loss_weight)" in p[0]
    p = problems({"datasets": [{"subsets": [{"image_dir": "x", "conditioning_data_dir": "y"}]}]})
    assert "--masked_loss" in p[0]
    p = problems({"dataset": []})
    assert p == ["top level: unknown table `dataset`; did you mean `datasets`?"]
    p = problems({"general": {"train_batch_size": 4}})
    assert p == ["[general]: unknown key `train_batch_size`: in the dataset config it is called `batch_size`"]
    p = problems({"datasets": [{"network_multiplier": 1, "subsets": [{"image_dir": "a"}]}]})
    assert p == ["[[datasets]] #1: `network_multiplier` must be a float (write 1.0, not 1), got int 1"]


def test_lenient_mode_converts_ints_to_floats():
    specs = D.load_dataset_config({"datasets": [{"network_multiplier": 1, "validation_split": 0, "face_crop_aug_range": [1, 3],
                                                 "subsets": [{"image_dir": "a"}]}]}, {"resolution": "512"}, strict=False)
    assert specs[0].network_multiplier == 1.0 and isinstance(specs[0].network_multiplier, float)
    assert specs[0].subsets[0].face_crop_aug_range == (1.0, 3.0)


def test_dataset_construction_checks():
    with pytest.raises(D.DatasetError) as ei:
        D.load_dataset_config({"datasets": [{"enable_bucket": True, "min_bucket_reso": 640, "subsets": [{"image_dir": "a"}]},
                                            {"subsets": [{"image_dir": "b"}]},
                                            {"resolution": 512, "resize_interpolation": "foo", "subsets": [{"image_dir": "c"}]}]},
                              {"resolution": None}, bucket_steps_multiple_of=None)
    p = ei.value.problems
    assert any("[[datasets]] #1: no resolution" in x for x in p)
    assert any("[[datasets]] #2: no resolution" in x for x in p)
    assert any("`resize_interpolation` must be one of" in x and "'foo'" in x for x in p)
    with pytest.raises(D.DatasetError) as ei:
        D.load_dataset_config({"datasets": [{"enable_bucket": True, "resolution": 512, "min_bucket_reso": 640,
                                             "bucket_reso_steps": 48, "subsets": [{"image_dir": "a"}]}]}, {}, bucket_steps_multiple_of=32)
    p = ei.value.problems
    assert any("min_bucket_reso (624) must be <=" in x for x in p)  # 640 is adjusted down to a multiple of 48 first
    assert any("multiple of 32" in x for x in p)
    warnings = []
    D.load_dataset_config({"datasets": [{"enable_bucket": True, "resolution": 512, "min_bucket_reso": 250,
                                         "max_bucket_reso": 1000, "subsets": [{"image_dir": "a"}]}]}, {}, warn=warnings.append)
    assert any("250 -> 192" in w for w in warnings) and any("1000 -> 1024" in w for w in warnings)


def test_cli_defaults_match_sd_scripts_parser():
    real = golden("cli_defaults.json")
    for k, v in S.SD_SCRIPTS_CLI_DEFAULTS.items():
        if k == "train_batch_size" or k in real:
            assert real[k] == (list(v) if isinstance(v, tuple) else v), k
    for o in S.DATASET_OPTIONS.values():
        if o.cli:
            assert o.cli in real, o.name
            assert real[o.cli] == o.default, o.name


def test_cli_values_are_fallbacks_and_parsed():
    specs = D.load_dataset_config({"datasets": [{"subsets": [{"image_dir": "a"}, {"image_dir": "b", "num_repeats": 2}]}]},
                                  {"resolution": "768,512", "train_batch_size": 4, "dataset_repeats": 3, "caption_extension": "txt",
                                   "face_crop_aug_range": "1.5,2.5"})
    ds = specs[0]
    assert ds.resolution == (768, 512) and ds.batch_size == 4
    assert [s.num_repeats for s in ds.subsets] == [3, 2]
    assert ds.subsets[0].caption_extension == ".txt"  # leading dot added like DreamBoothSubset
    assert ds.subsets[0].face_crop_aug_range == (1.5, 2.5)


@pytest.mark.parametrize("name", ["doc_example_1.toml", "doc_example_2.toml", "doc_example_3.toml"])
def test_doc_examples_parse_unchanged(name):
    """TOML blocks copied verbatim from sd-scripts docs/config_README-en.md (extracted by gen_config.py)."""
    path = os.path.join(GOLDEN, name)
    with open(path, "rb") as f:
        ours = tomllib.load(f)
    case = next(c for c in CASES if c.get("toml_file") == name and c["cli"] == {})
    assert ours == case["config"]  # tomllib == sd-scripts' toml 0.10.2 on these files
    specs = D.load_dataset_config(path, {}, warn=lambda m: None)
    assert [_norm(s.sdscripts_params()) for s in specs] == [e["params"] for e in case["result"]["ok"]]


def test_folder_convention_matches_sd_scripts(tmp_path):
    g = golden("subdirs.json")
    for d in g["train_folders"]:
        (tmp_path / "train" / d).mkdir(parents=True)
    for f in g["train_files"]:
        (tmp_path / "train" / f).write_text("")
    for d in g["reg_folders"]:
        (tmp_path / "reg" / d).mkdir(parents=True)
    warnings = []
    subs = D.subsets_from_folders(str(tmp_path / "train"), str(tmp_path / "reg"), warn=warnings.append)
    for s in subs:
        s["image_dir"] = os.path.relpath(s["image_dir"], tmp_path)
    assert sorted(subs, key=lambda s: s["image_dir"]) == g["subsets"]
    assert [s["is_reg"] for s in subs] == sorted(s["is_reg"] for s in subs)  # train first, then reg
    assert len(warnings) == 2 and any("abc" in w for w in warnings) and any("x_10" in w for w in warnings)
    assert D.subsets_from_folders(str(tmp_path / "nope"), None) == g["missing_dir_subsets"] == []


def test_parse_folder_name():
    assert D.parse_folder_name("10_sks dog") == (10, "sks dog")
    assert D.parse_folder_name("3_a_b") == (3, "a_b")
    assert D.parse_folder_name("5") == (5, "")
    assert D.parse_folder_name("abc_1") is None


def test_load_datasets_paths(tmp_path):
    (tmp_path / "5_cat").mkdir()
    specs = D.dataset_specs({"train_data_dir": str(tmp_path), "resolution": "512"})
    assert specs[0].kind == S.DB and specs[0].subsets[0].num_repeats == 5 and specs[0].subsets[0].class_tokens == "cat"
    specs = D.dataset_specs({"train_data_dir": str(tmp_path), "in_json": "m.json", "resolution": "512"})
    assert specs[0].kind == S.FT and specs[0].subsets[0].metadata_file == "m.json"
    toml = tmp_path / "d.toml"
    toml.write_text("[[datasets]]\nresolution = 256\n[[datasets.subsets]]\nimage_dir = 'C:\\data'\n")
    warnings = []
    specs = D.dataset_specs({"train_data_dir": "x"}, str(toml), warn=warnings.append)
    assert specs[0].resolution == (256, 256) and specs[0].subsets[0].image_dir == "C:\\data"
    assert any("train_data_dir" in w for w in warnings)


def test_unparseable_toml_names_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[general]\nimage_dir = "C:\\data"\n')
    with pytest.raises(D.DatasetError) as ei:
        D.load_dataset_config(str(bad))
    assert "bad.toml" in str(ei.value) and "single quotes" in str(ei.value)


def test_option_table_covers_schema():
    rows = {r["key"]: r for r in S.option_table()}
    assert rows["batch_size"]["subset"] is False and rows["batch_size"]["cli"] == "--train_batch_size"
    assert rows["image_dir"]["general"] is False and rows["image_dir"]["subset"] is True
    assert rows["class_tokens"]["general"] and rows["class_tokens"]["kinds"] == ["dreambooth"]
    assert rows["prior_loss_weight"]["type"] == "(command line only)"


# ----------------------------------------------------------------------------------------------------
# buckets




G = golden("buckets.json")


@pytest.mark.parametrize("case", G["make_bucket_resolutions"], ids=lambda c: str(c["args"]))
def test_make_bucket_resolutions(case):
    args = case["args"]
    assert [list(r) for r in B.make_bucket_resolutions(tuple(args[0]), *args[1:])] == case["resos"]


@pytest.mark.parametrize("setting", G["settings"], ids=lambda s: s["setting"]["name"])
def test_select_bucket_matches_bucket_manager(setting):
    s = setting["setting"]
    enable = s.get("enable_bucket", True)
    bs = B.bucket_settings(s["resolution"], enable, s.get("min_bucket_reso", 256), s.get("max_bucket_reso", 1024),
                           s.get("bucket_reso_steps", 64), s.get("no_upscale", False))
    if enable:
        assert [bs.min_bucket_reso, bs.max_bucket_reso] == setting["adjusted_min_max"]
    ok_sizes = []
    for im in setting["images"]:
        w, h = im["size"]
        if "error" in im:  # sd-scripts: ZeroDivisionError; we raise a clear ValueError
            with pytest.raises(ValueError, match="smaller than bucket_reso_steps"):
                B.plan_buckets([(w, h)], bs)
            continue
        plan = B.plan_buckets([(w, h)], bs)
        c = plan.choices[0]
        assert list(c.reso) == im["reso"] and list(c.resized_size) == im["resized"], (w, h)
        assert c.ar_error == im["ar_error"]
        assert [float(x) for x in B.get_crop_ltrb(c.reso, (w, h))] == im["crop_ltrb"]
        ok_sizes.append((w, h))
    if "predefined_resos" in setting:
        assert [list(r) for r in B.plan_buckets([(512, 512)], bs).predefined] == setting["predefined_resos"]
    used = [list(r) for r in B.plan_buckets(ok_sizes, bs).resos]
    assert used == [r for r in setting["sorted_used_resos"] if 0 not in r]


META = golden("resize.json")


def assert_digest(a, m):
    import hashlib
    assert hashlib.sha256(str(a.shape).encode() + np.ascontiguousarray(a).tobytes()).hexdigest() == m["sha256"], m["key"]


def _img(w, h, kind, seed, channels=3):
    """Same generator as gen_buckets.test_image."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 / max(w - 1, 1)), (yy * 255 / max(h - 1, 1)), ((xx + yy) * 127 / max(w + h - 2, 1))][:3], -1)
    base = base + 40 * np.sin(xx[..., None] / 3.0) + rng.normal(0, 6, (h, w, 3))
    img = np.clip(base, 0, 255).astype(np.uint8)
    if channels == 4:
        img = np.concatenate([img, rng.integers(0, 256, (h, w, 1), dtype=np.uint8)], -1)
    return img


@pytest.mark.parametrize("m", META["trim"], ids=lambda m: m["key"])
def test_trim_and_resize_pixel_exact(m):
    """Default interpolation (area shrink = our numpy INTER_AREA port, lanczos = PIL): identical pixels,
    same random crop offsets from random.Random(seed) as sd-scripts' random.seed(seed)."""
    w, h = m["size"]
    img = _img(w, h, m["kind"], seed=w * 1000 + h)
    bs = B.bucket_settings((32, 32), True, 16, 64, 8, m["no_upscale"])
    c = B.plan_buckets([(w, h)], bs).choices[0]
    assert list(c.reso) == m["reso"] and list(c.resized_size) == m["resized"]
    out, orig, crop = B.trim_and_resize(img, c.reso, c.resized_size, m["random_crop"], random.Random(m["rng_seed"]))
    assert list(orig) == m["original_size"] and [float(x) for x in crop] == m["crop_ltrb"]
    assert_digest(out, m)


EXACT = {None, "area", "lanczos", "box", "nearest"}


@pytest.mark.parametrize("m", [m for m in META["resize"] if m["interpolation"] in EXACT], ids=lambda m: m["key"])
def test_resize_image_exact_methods(m):
    w, h = m["size"]
    nw, nh = m["new_size"]
    img = _img(w, h, m["kind"], seed=w + h, channels=m["channels"])
    if m["interpolation"] == "area" and (nw > w or nh > h) and B._cv2() is None:
        pytest.skip("area upscale needs cv2 (falls back to PIL)")
    assert_digest(B.resize_image(img, nw, nh, m["interpolation"]), m)





@settings(max_examples=150, deadline=None)
@given(w=st.integers(2, 120), h=st.integers(2, 120), fx=st.floats(0.05, 1.0), fy=st.floats(0.05, 1.0), ch=st.sampled_from([1, 3, 4]))
def test_area_down_is_mean_preserving_and_bounded(w, h, fx, fy, ch):
    """Properties of the INTER_AREA port (exactness itself is covered by the OpenCV goldens above)."""
    nw, nh = max(1, int(w * fx)), max(1, int(h * fy))
    img = np.random.default_rng(w * h).integers(0, 256, (h, w, ch) if ch > 1 else (h, w), dtype=np.uint8)
    out = B.resize_area_down(img, nw, nh)
    assert out.shape[:2] == (nh, nw)
    assert out.min() >= img.min() and out.max() <= img.max()
    assert abs(out.astype(float).mean() - img.astype(float).mean()) < 8


@settings(max_examples=150, deadline=None)
@given(w=st.integers(1, 160), h=st.integers(1, 160), fx=st.floats(0.02, 1.0), fy=st.floats(0.02, 1.0), ch=st.sampled_from([1, 3, 4]),
       kind=st.sampled_from(["noise", "smooth"]))
def test_area_shrink_is_opencv_inter_area(w, h, fx, fy, ch, kind):
    """The default shrink is cv2.resize(INTER_AREA) itself (what sd-scripts calls), and the numpy port used without cv2 equals it."""
    cv2 = pytest.importorskip("cv2")
    nw, nh = max(1, int(w * fx)), max(1, int(h * fy))
    img = _img(w, h, "noise" if min(w, h) < 2 else kind, seed=w * h, channels=max(ch, 3))
    img = img[:, :, 0] if ch == 1 else img[:, :, :ch]
    want = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    assert np.array_equal(B.resize_image(img, nw, nh), want)
    assert np.array_equal(B.resize_area_down(img, nw, nh), want)


def test_constant_image_stays_constant():
    img = np.full((97, 61, 3), 137, np.uint8)
    assert (B.resize_area_down(img, 50, 31) == 137).all()


# ------------------------------------------------------------------ batches / sampler
def _buckets():
    sizes = [(640, 480), (480, 640), (512, 512), (1024, 300), (300, 300), (2000, 1000), (700, 900)]
    plan = B.plan_buckets(sizes, B.bucket_settings((512, 512), True))
    return plan, B.fill_buckets(plan.bucket_of, [10, 10, 10, 10, 3, 3, 3], len(plan.resos))


def test_batches_never_mix_buckets_and_cover_everything():
    plan, bk = _buckets()
    for bs in (1, 2, 3, 7):
        for epoch in (0, 1, 5):
            batches = B.epoch_batches(bk, bs, seed=123, epoch=epoch)
            assert len(batches) == sum(math.ceil(len(b) / bs) for b in bk)
            for batch in batches:
                assert len({plan.bucket_of[i] for i in batch}) == 1 and 1 <= len(batch) <= bs
            assert sorted(i for b in batches for i in b) == sorted(i for b in bk for i in b)


def test_epoch_order_depends_on_seed_and_epoch_and_is_reproducible():
    _, bk = _buckets()
    a = B.epoch_batches(bk, 2, 1, 1)
    assert a == B.epoch_batches(bk, 2, 1, 1)
    assert a != B.epoch_batches(bk, 2, 1, 2) and a != B.epoch_batches(bk, 2, 2, 1)


def test_sampler_incremental_equals_recomputed():
    _, bk = _buckets()
    s = B.BucketBatchSampler(bk, 3, seed=99)
    for e in (1, 2, 3, 5, 2, 4):
        s.set_epoch(e)
        assert list(s) == B.epoch_batches(bk, 3, 99, e)
        assert len(s) == len(B.batch_index(bk, 3))


def test_summary_and_bucket_info():
    plan, bk = _buckets()
    text = B.bucket_summary(plan, bk, 2)
    assert "512x512" in text and "total: 49 images" in text
    info = B.bucket_info(plan, bk)
    assert sum(v["count"] for v in info["buckets"].values()) == 49
    assert info["mean_img_ar_error"] == pytest.approx(plan.mean_ar_error)


@pytest.mark.parametrize("m", META["sweep"], ids=lambda m: m["key"])
def test_numpy_ports_bit_exact_with_opencv(m):
    """Random sizes (one in three with integer factors = OpenCV's fast-area path), OpenCV 4.10 outputs as golden."""
    nw, nh = m["new_size"]
    w, h = m["size"]
    img = np.random.default_rng(m["seed"]).integers(0, 256, (h, w, m["channels"]), dtype=np.uint8)
    assert_digest(B.resize_image(img, nw, nh, m["interpolation"]), m)


# ----------------------------------------------------------------------------------------------------
# captions




CAP = golden("captions.json")


def _opts(params):
    d = {k: v for k, v in CAP["defaults"].items() if k in C.CaptionOptions.__dataclass_fields__}
    d.update(params)
    return C.CaptionOptions(**d)


@pytest.mark.parametrize("case", CAP["cases"], ids=lambda c: c["name"])
def test_process_caption_matches_sd_scripts(case):
    opts = _opts(case["params"])
    for r in case["results"]:
        out = C.process_caption(case["caption"], opts, random.Random(r["seed"]), epoch=r["epoch"], step=r["step"],
                                max_train_steps=r["max_train_steps"])
        assert out == r["out"], (r, out)


def test_caption_options_from_subset_spec():
    spec = D.load_dataset_config({"datasets": [{"subsets": [{"image_dir": "a", "keep_tokens": 2, "shuffle_caption": True}]}]},
                                 {"resolution": "512"})
    o = C.CaptionOptions.from_subset(spec[0].subsets[0])
    assert o.keep_tokens == 2 and o.shuffle_caption and o.caption_separator == "," and o.keep_tokens_separator == ""
    assert C.process_caption("a, b, c, d", spec[0].subsets[0], random.Random(0)) == C.process_caption("a, b, c, d", o, random.Random(0))


def test_cacheability_rule():
    assert C.is_text_encoder_output_cacheable(C.CaptionOptions())
    assert not C.is_text_encoder_output_cacheable(C.CaptionOptions(shuffle_caption=True))
    assert not C.is_text_encoder_output_cacheable(C.CaptionOptions(caption_dropout_rate=0.1))
    assert C.is_text_encoder_output_cacheable(C.CaptionOptions(caption_dropout_rate=0.1), cache_supports_dropout=True)


def test_read_caption_rules(tmp_path):
    img = tmp_path / "x.png"
    (tmp_path / "x.caption").write_text("  first, a  \n\n second \n", encoding="utf-8")
    assert C.read_caption(str(img), ".caption") == "first, a"
    assert C.read_caption(str(img), ".caption", enable_wildcard=True) == "first, a\nsecond"
    assert C.read_caption(str(img), ".txt") is None
    face = tmp_path / "g_1_2_3_4.png"
    (tmp_path / "g.txt").write_text("face", encoding="utf-8")
    assert C.read_caption(str(face), ".txt") == "face"
    (tmp_path / "e.txt").write_text("", encoding="utf-8")
    with pytest.raises(C.CaptionFileError, match="empty"):
        C.read_caption(str(tmp_path / "e.png"), ".txt")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(C.CaptionFileError, match="UTF-8"):
        C.read_caption(str(tmp_path / "b.png"), ".txt")


def test_class_tokens_fallback_and_single_warning(tmp_path):
    paths = [str(tmp_path / f"{i}.png") for i in range(8)]
    (tmp_path / "0.txt").write_text("cap zero", encoding="utf-8")
    caps, missing = C.dreambooth_captions(paths, ".txt", "sks dog")
    assert caps[0] == "cap zero" and caps[1:] == ["sks dog"] * 7 and missing == paths[1:]
    caps, _ = C.dreambooth_captions(paths, ".txt", None)
    assert caps[1] == ""
    w = C.missing_captions_warning(missing)
    assert w.startswith("No caption file found for 7 images") and "... and 2 more" in w and w.count("\n") == 5


def test_finetuning_caption_rules():
    assert C.finetuning_caption("a cat", "t1, t2") == "a cat,t1, t2"
    assert C.finetuning_caption(None, "t") == "t"
    assert C.finetuning_caption("a\nb", "t\nu", ",", enable_wildcard=True) == "a,t,u\nb,t,u"
    assert C.finetuning_caption(None, "only tags", ",", enable_wildcard=True) == ""  # sd-scripts quirk


# ------------------------------------------------------------------ tokens
TOK = golden("tokens.json")
PATH = ASSETS / "clip_tokenizer"


@pytest.fixture(scope="module")
def tokenizers():
    return {"v1": CLIPTokenizer.from_pretrained(PATH, model_max_length=77),
            "v2": CLIPTokenizer.from_pretrained(PATH, model_max_length=77, pad_token="!")}


def test_get_input_ids_matches_sd_scripts(tokenizers):
    n = 0
    for c in TOK["cases"]:
        if "input_ids" not in c:
            continue
        ids = C.get_input_ids(tokenizers[c["tokenizer"]], TOK["captions"][c["caption"]], c["max_token_length"])
        assert ids.tolist() == c["input_ids"], (c["tokenizer"], c["max_token_length"], c["caption"])
        n += 1
    assert n == 72


def _fake_encode(ids):
    r = torch.arange(ids.shape[0]).view(-1, 1).expand_as(ids).float()
    p = torch.arange(ids.shape[1]).view(1, -1).expand_as(ids).float()
    return torch.stack([r, p, ids.float()], -1)


def test_encode_chunked_matches_sd_scripts(tokenizers):
    for c in TOK["cases"]:
        if "pair" not in c:
            continue
        tok = tokenizers[c["tokenizer"]]
        batch = torch.stack([C.get_input_ids(tok, TOK["captions"][k], c["max_token_length"]) for k in c["pair"]])
        out = C.encode_chunked(batch, _fake_encode).int().tolist()
        assert out == c["encode_tokens"] == c["get_hidden_states"]


def test_chunk_shapes(tokenizers):
    tok = tokenizers["v1"]
    for mtl, n in ((None, 1), (75, 1), (150, 2), (225, 3)):
        ids = C.get_input_ids(tok, "a photo of a cat", mtl)
        assert ids.shape == (n, 77) and (ids[:, 0] == tok.bos_token_id).all() and (ids[:, -1] == tok.eos_token_id).all()
        hs = C.encode_chunked(ids.unsqueeze(0), lambda x: torch.randn(x.shape[0], 77, 8))
        assert hs.shape == (1, 77 if n == 1 else n * 75 + 2, 8)


# ----------------------------------------------------------------------------------------------------
# datasetbuild




E2E = golden("e2e.json")


def build_tree(root):
    for rel, v in E2E["tree"].items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if isinstance(v, list):
            Image.new("RGB", tuple(v), (120, 30, 200)).save(p)
        else:
            with open(p, "w", encoding="utf-8") as f:
                f.write(v)


def subst(x, root):
    if isinstance(x, dict):
        return {k: subst(v, root) for k, v in x.items()}
    if isinstance(x, list):
        return [subst(v, root) for v in x]
    if isinstance(x, str) and x.startswith("<root>/"):
        return os.path.join(root, x[len("<root>/"):])
    return x


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("e2e"))
    build_tree(root)
    return root


@pytest.mark.parametrize("case", E2E["cases"], ids=lambda c: c["name"])
def test_dataset_matches_sd_scripts(case, tree):
    root = tree
    cfg = subst(case["user_config"], root)
    if case["name"].startswith("folders"):  # the folder convention must produce the very same subsets
        ours = D.subsets_from_folders(os.path.join(root, "train"), os.path.join(root, "reg"), warn=lambda m: None)
        assert ours == cfg["datasets"][0]["subsets"]
    specs = D.load_dataset_config(cfg, case["cli"], warn=lambda m: None)
    plans = [R.plan_dataset(s, warn=lambda m: None) for s in specs]
    seed = R.sdscripts_dataset_seed(case["dataset_seed_source"])
    assert R.batches_per_epoch(plans) == case["len_group"]
    assert sum(p.images.num_train_images for p in plans) == case["num_train_images"]
    assert sum(p.images.num_reg_images for p in plans) == case["num_reg_images"]
    rel = lambda p: os.path.relpath(p, root) if os.path.isabs(p) else p  # noqa: E731
    for plan, g in zip(plans, case["datasets"]):
        assert g["seed"] == seed
        assert plan.num_batches == g["len"]
        items = plan.images.items
        ours = [{"key": rel(it.key), "abs": rel(it.path), "num_repeats": it.num_repeats, "caption": it.caption,
                 "is_reg": it.is_reg, "image_size": list(it.image_size), "bucket_reso": list(c.reso),
                 "resized_size": list(c.resized_size)} for it, c in zip(items, plan.plan.choices)]
        assert ours == g["images"]
        assert [list(r) for r in plan.plan.resos] == g["resos"]
        info = plan.bucket_info()
        if g["bucket_info"] is None:
            assert info is None
        else:
            assert {str(k): {"resolution": list(v["resolution"]), "count": v["count"]} for k, v in info["buckets"].items()} == g["bucket_info"]["buckets"]
            assert info["mean_img_ar_error"] == pytest.approx(g["bucket_info"]["mean_img_ar_error"], abs=1e-15)
        assert plan.images.tag_frequency == g["tag_frequency"]
        used = [{"image_dir": rel(plan.spec.subsets[i].image_dir) if plan.spec.subsets[i].image_dir else None,
                 "img_count": plan.images.img_count[i]} for i in plan.images.used_subsets]
        assert used == g["subsets"]
        sampler = plan.sampler(seed)
        for epoch, snap in g["epochs"].items():
            state, index = B.epoch_state(plan.buckets, plan.spec.batch_size, seed, int(epoch))
            assert [[rel(items[i].key) for i in b] for b in state] == snap["buckets"], epoch
            assert [[b, plan.spec.batch_size, k] for b, k in index] == snap["buckets_indices"], epoch
            sampler.set_epoch(int(epoch))
            assert [[rel(items[i].key) for i in batch] for batch in sampler] == [
                snap["buckets"][b][k * bs:(k + 1) * bs] for b, bs, k in snap["buckets_indices"]]


@pytest.mark.parametrize("n_train,reg,expected", [
    (49, [1, 1, 1], [17, 16, 16]),
    (2, [1, 1, 1, 1], [1, 1]),
    (0, [3, 3], []),
    (5, [10], [10]),  # first pass overshoots: not reduced
    (7, [2, 2], [4, 3]),
])
def test_balance_reg_repeats(n_train, reg, expected):
    assert R.balance_reg_repeats(n_train, reg) == expected


@given(st.integers(0, 400), st.lists(st.integers(1, 20), min_size=1, max_size=12))
def test_balance_reg_repeats_properties(n_train, reg):
    out = R.balance_reg_repeats(n_train, reg)
    assert len(out) <= len(reg)
    if n_train == 0:
        assert out == []
    else:
        total = sum(out)
        assert total >= n_train
        if sum(reg) <= n_train:  # all used and exactly balanced
            assert len(out) == len(reg) and total == n_train and all(o >= r for o, r in zip(out, reg))


def test_epoch_accounting():
    assert R.steps_per_epoch(50, 1) == 50 and R.steps_per_epoch(50, 4) == 13 and R.steps_per_epoch(50, 4, 2) == 7
    assert R.max_train_steps_for_epochs(10, 50, 4) == 130
    assert R.num_train_epochs(1600, 50) == 32 and R.num_train_epochs(1600, 50, 4) == 124


def _save_img(path, size, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (1, 2, 3)).save(path, fmt)


def test_scan_dataset_reports_everything(tmp_path):
    t = str(tmp_path)
    _save_img(f"{t}/ok/a.png", (512, 512))
    open(f"{t}/ok/a.txt", "w").write("a")
    _save_img(f"{t}/ok/b.png", (100, 80))  # below the smallest bucket: warning only
    open(f"{t}/ok/c.jpg", "wb").write(b"\xff\xd8\xff\xe0garbage")  # corrupt
    _save_img(f"{t}/ok/d.png", (600, 600))
    with open(f"{t}/ok/d.png", "r+b") as f:  # truncated: header fine, pixels missing
        f.truncate(60)
    open(f"{t}/ok/e.txt", "w").write("")  # empty caption file for e.png
    _save_img(f"{t}/ok/e.png", (512, 512))
    os.makedirs(f"{t}/empty")
    _save_img(f"{t}/upper/x.Png", (64, 64))
    _save_img(f"{t}/tiny/t.png", (40, 30))
    cfg = {"datasets": [
        {"resolution": 512, "enable_bucket": True, "subsets": [
            {"image_dir": f"{t}/ok", "caption_extension": ".txt"}, {"image_dir": f"{t}/empty"}, {"image_dir": f"{t}/missing"},
            {"image_dir": f"{t}/upper"}]},
        {"resolution": 512, "enable_bucket": True, "bucket_no_upscale": True, "subsets": [{"image_dir": f"{t}/tiny", "class_tokens": "x"}]},
        {"resolution": 512, "subsets": [{"image_dir": f"{t}/ok", "caption_extension": ".txt"}]},
    ]}
    specs = D.load_dataset_config(cfg, {}, warn=lambda m: None)
    problems = scan_dataset(specs)
    text = "\n".join(problems)
    assert f"{t}/ok/c.jpg: cannot read image" in text
    assert f"{t}/ok/d.png: cannot read image" in text
    assert f"caption file is empty: {t}/ok/e.txt" in text
    assert f"warning: {t}/empty: no images" in text and "this subset is ignored" in text   # sd-scripts: "ignore subset ..."
    assert f"{t}/missing: image folder not found" in text
    assert f"{t}/upper: no images" in text and "unexpected case, e.g. x.Png" in text
    assert any(p.startswith("warning:") and f"{t}/ok/b.png" in p and "smallest bucket" in p for p in problems)
    assert any(f"{t}/tiny/t.png" in p and "bucket_no_upscale" in p and not p.startswith("warning") for p in problems)
    # images without caption file and without class_tokens: a warning naming them and the fix (they train with an empty
    # caption, as in sd-scripts)
    assert any(p.startswith(f"warning: {t}/ok: ") and "EMPTY caption" in p and "no .txt caption file and the subset has no class_tokens" in p and "b.png" in p for p in problems)
    # without bucketing lora_kit scales small images up (sd-scripts stops): a warning
    assert any(p.startswith(f"warning: {t}/ok/b.png: 100x80 is smaller than resolution 512x512 and bucketing is off") for p in problems)
    assert not any("No data found" in p for p in problems)
    # headers-only mode misses the truncated PNG but still finds the garbage JPEG
    quick = "\n".join(scan_dataset(specs, decode=False))
    assert f"{t}/ok/c.jpg: cannot read image" in quick


def test_scan_no_data(tmp_path):
    specs = D.load_dataset_config({"datasets": [{"resolution": 512, "subsets": [{"image_dir": str(tmp_path)}]}]}, {})
    problems = scan_dataset(specs)
    assert any("no images" in p for p in problems) and problems[-1].startswith("No data found")


def test_finetuning_metadata_jsonl(tmp_path):
    _save_img(f"{tmp_path}/i/a.png", (640, 480))
    with open(f"{tmp_path}/m.jsonl", "w") as f:
        f.write(json.dumps({"image_path": "a.png", "caption": "c", "tags": "t"}) + "\n")
    specs = D.load_dataset_config({"datasets": [{"resolution": 512, "subsets": [
        {"image_dir": f"{tmp_path}/i", "metadata_file": f"{tmp_path}/m.jsonl"}]}]}, {})
    plan = R.plan_dataset(specs[0])
    assert plan.images.items[0].caption == "c,t" and plan.num_batches == 1
    assert [p.split(": ", 2)[2][:40] for p in scan_dataset(specs)] == ["640x480 is smaller than resolution 512x5"]
    specs[0].enable_bucket = True
    assert scan_dataset(specs) == []





def test_split_train_val():
    import random
    paths = [f"{i}.png" for i in range(10)]
    tr = R.split_train_val(paths, 0.25, True, random.Random(3))
    va = R.split_train_val(paths, 0.25, False, random.Random(3))
    assert len(tr) == 8 and len(va) == 2 and set(tr) | set(va) == set(paths)  # ceil(7.5), round(2.5) = 2
    tr = R.split_train_val(paths, 0.35, True, random.Random(3))
    va = R.split_train_val(paths, 0.35, False, random.Random(3))
    assert len(tr) == 7 and len(va) == 4 and len(set(tr) & set(va)) == 1  # sd-scripts' rounding overlaps one image


# ----------------------------------------------------------------------------------------------------
# --weighted_captions (golden from tools/golden_weighted_captions.py: sd-scripts' parse_prompt_attention and
# SdTokenizeStrategy.tokenize_with_weights)

WEIGHTED = golden("weighted_captions.json")
WEIGHT_TOKENIZERS = {"sd1": CLIPTokenizer.from_pretrained(ASSETS / "clip_tokenizer", model_max_length=77),
                     "sd2": CLIPTokenizer.from_pretrained(ASSETS / "clip_tokenizer", model_max_length=77, pad_token="!")}


@pytest.mark.parametrize("caption", list(WEIGHTED["parse"]))
def test_parse_prompt_attention_matches_sd_scripts(caption):
    assert C.parse_prompt_attention(caption) == WEIGHTED["parse"][caption]


def test_weighted_input_ids_match_sd_scripts():
    for case in WEIGHTED["tokens"]:
        ids, weights = C.get_weighted_input_ids(WEIGHT_TOKENIZERS[case["family"]], case["caption"], case["max_token_length"])
        assert ids.tolist() == case["ids"], (case["family"], case["max_token_length"], case["caption"])
        assert torch.equal(weights, torch.tensor(case["weights"])), (case["family"], case["max_token_length"], case["caption"])
