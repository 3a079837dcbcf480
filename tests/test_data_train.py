"The loop with the dataset options: latents cached to disk and reused, text-encoder outputs cached, 225-token captions."
import numpy as np
import pytest
import torch

from lora_kit.config import make_config
from lora_kit.toy.world import write_folder
from lora_kit.train import train

torch.set_num_threads(1)


def _cfg(tmp_path, *extra):
    return make_config(["--pretrained_model_name_or_path", "tiny-sd1", "--network_module", "networks.lora",
                        "--train_data_dir", str(tmp_path / "data"), "--caption_extension", ".txt", "--resolution", "64",
                        "--train_batch_size", "2", "--max_train_steps", "2", "--seed", "1", "--output_dir", str(tmp_path / "out"),
                        "--max_data_loader_n_workers", "0", *extra])


def test_disk_cache_written_then_reused_and_long_captions(tmp_path):
    write_folder(tmp_path / "data" / "1_sks", n=3, seed=0)
    args = ("--cache_latents_to_disk", "--flip_aug", "--vae_batch_size", "2", "--max_token_length", "225")
    train(_cfg(tmp_path, *args))
    files = sorted((tmp_path / "data" / "1_sks").glob("*_0064x0064_sd.npz"))
    assert len(files) == 3
    with np.load(files[0]) as z:
        assert {"lora_kit_key", "lora_kit_latents", "lora_kit_latents_flipped"} <= set(z.files)
    stamps = [f.stat().st_mtime_ns for f in files]
    state = train(_cfg(tmp_path, *args, "--output_name", "again"))
    assert [f.stat().st_mtime_ns for f in files] == stamps and state.step == 2   # reused, not rewritten


def test_text_encoder_outputs_cached(tmp_path):
    write_folder(tmp_path / "data" / "1_sks", n=2, seed=0)
    state = train(_cfg(tmp_path, "--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only"))
    assert state.step == 2 and np.isfinite(state.loss)


def test_cached_models_freed_only_when_unused(tmp_path):
    """With every latent and caption cached, training frees the VAE and the frozen text encoder it loaded itself; it keeps
    them when it did not load them (the caller may use them), when sampling needs them, or when the text encoder trains."""
    from lora_kit.family import load_components
    from lora_kit.sample import SampleCallback
    write_folder(tmp_path / "data" / "1_sks", n=2, seed=0)
    (tmp_path / "prompts.txt").write_text("a red sks --w 64 --h 64 --s 2\n")
    cached = ("--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only")
    state = train(_cfg(tmp_path, *cached, "--output_name", "a"))
    assert state.comp.vae is None and state.comp.text_encoders == [None] and state.step == 2
    cfg = _cfg(tmp_path, *cached, "--output_name", "b")
    comp = load_components(cfg)
    assert train(cfg, comp=comp).comp.vae is comp.vae is not None
    cfg = _cfg(tmp_path, *cached, "--output_name", "c", "--sample_prompts", str(tmp_path / "prompts.txt"), "--sample_every_n_steps", "1")
    kept = train(cfg, [SampleCallback(cfg)]).comp
    assert kept.vae is not None and len(kept.text_encoders) == 1 and len(list((tmp_path / "out" / "sample").glob("c_*.png"))) == 2
    partly = train(_cfg(tmp_path, "--cache_latents", "--output_name", "d")).comp
    assert partly.vae is None and len(partly.text_encoders) == 1


def test_alpha_mask_transparent_images_teach_nothing(tmp_path):
    """With alpha_mask the loss is weighted by the images' alpha: on fully transparent images it is exactly 0 and the
    LoRA stays untrained (lora_up starts at zero); the same images without alpha_mask train it. Also with cached latents."""
    from PIL import Image
    from lora_kit.lora import load_lora
    write_folder(tmp_path / "data" / "1_sks", n=2, seed=0)
    for p in (tmp_path / "data" / "1_sks").glob("*.png"):
        im = Image.open(p).convert("RGBA"); im.putalpha(0); im.save(p)
    for name, extra in (("masked", ("--alpha_mask",)), ("masked_cached", ("--alpha_mask", "--cache_latents")), ("plain", ())):
        state = train(_cfg(tmp_path, "--output_name", name, "--learning_rate", "1e-2", *extra))
        ups = [v for k, v in load_lora(tmp_path / "out" / f"{name}.safetensors")[0].items() if k.endswith("lora_up.weight")]
        if name == "plain": assert state.loss > 0 and any(u.abs().sum() > 0 for u in ups)
        else: assert [h[2] for h in state.history] == [0.0, 0.0] and all(u.abs().sum() == 0 for u in ups)


def test_masked_loss_black_masks_teach_nothing(tmp_path):
    """--masked_loss with a dataset TOML whose subset has conditioning_data_dir: the loss is weighted by the mask images
    (red channel, 0-1), so all-black masks give loss 0 and an untrained LoRA, also with cached latents; white masks
    train as without a mask. Without --masked_loss sd-scripts' schema refuses conditioning_data_dir."""
    from PIL import Image
    from lora_kit.config import ConfigError
    from lora_kit.lora import load_lora
    write_folder(tmp_path / "img", n=2, seed=0)
    for shade in ("black", "white"):
        (tmp_path / shade).mkdir()
        for p in (tmp_path / "img").glob("*.png"): Image.new("RGB", Image.open(p).size, shade).save(tmp_path / shade / p.name)
        (tmp_path / f"{shade}.toml").write_text(f'[[datasets]]\nresolution = 64\nbatch_size = 2\n[[datasets.subsets]]\n'
                                                f'image_dir = "{tmp_path / "img"}"\nconditioning_data_dir = "{tmp_path / shade}"\ncaption_extension = ".txt"\n')
    run = lambda shade, *extra: train(make_config(["--pretrained_model_name_or_path", "tiny-sd1", "--network_module", "networks.lora",
        "--dataset_config", str(tmp_path / f"{shade}.toml"), "--max_train_steps", "2", "--seed", "1", "--learning_rate", "1e-2",
        "--output_dir", str(tmp_path / "out"), "--output_name", shade + "".join(extra), "--max_data_loader_n_workers", "0", *extra]))
    ups = lambda name: [v for k, v in load_lora(tmp_path / "out" / f"{name}.safetensors")[0].items() if k.endswith("lora_up.weight")]
    for extra in ((), ("--cache_latents",)):
        state = run("black", "--masked_loss", *extra)
        assert [h[2] for h in state.history] == [0.0, 0.0] and all(u.abs().sum() == 0 for u in ups("black--masked_loss" + "".join(extra)))
    white = run("white", "--masked_loss")
    assert white.loss > 0 and any(u.abs().sum() > 0 for u in ups("white--masked_loss"))
    with pytest.raises(ConfigError, match="conditioning_data_dir.*--masked_loss"): run("white")


def test_debug_dataset_prints_batches_without_training(tmp_path, monkeypatch, capsys):
    "--debug_dataset prints each batch of an epoch (bucket, images, processed captions) and loads no model, writes nothing."
    import lora_kit.train as T
    write_folder(tmp_path / "data" / "1_sks", n=3, seed=0)
    monkeypatch.setattr(T, "load_components", lambda cfg: pytest.fail("loaded a model"))
    cfg = make_config(["--pretrained_model_name_or_path", "tiny-sd1", "--network_module", "networks.lora", "--train_data_dir",
                       str(tmp_path / "data"), "--caption_extension", ".txt", "--resolution", "64", "--train_batch_size", "2",
                       "--debug_dataset"])
    state = T.train(cfg)
    out = capsys.readouterr().out
    assert state.step == 0 and not (tmp_path / "out").exists()
    assert out.count("dataset 0, epoch 1, batch") == 2 and out.count("caption: ") == 3 and "bucket (64, 64)" in out


def test_face_crop_aug_range_keeps_the_named_face_in_every_crop(tmp_path):
    """--face_crop_aug_range with sd-scripts' file-name convention name_cx_cy_w_h: without buckets each step's crop holds the
    face at 1/high..1/low of the crop's side (a plain centre crop would miss it); with buckets sd-scripts ignores it, so does lora_kit."""
    from PIL import Image
    from lora_kit.data import load_datasets
    (tmp_path / "data" / "1_sks").mkdir(parents=True)
    img = np.zeros((300, 500, 3), np.uint8); img[20:60, 400:440] = 255           # a 40 px "face" centred at (420, 40)
    Image.fromarray(img).save(tmp_path / "data" / "1_sks" / "me_420_40_40_40.png")
    (tmp_path / "data" / "1_sks" / "me_420_40_40_40.txt").write_text("sks")
    ds = load_datasets(_cfg(tmp_path, "--face_crop_aug_range", "2.0,4.0"))[0][0]
    sizes = set()
    for epoch in range(12):
        face = ds[(0, epoch, 0)]["pixels"][0] > 0          # white in [-1, 1]
        rows, cols = face.any(1).nonzero().flatten(), face.any(0).nonzero().flatten()
        assert len(rows) and 0 < cols.min() and cols.max() < 63 and 0 < rows.min() and rows.max() < 63
        sizes.add(len(rows)); assert 14 <= len(rows) <= 34
    assert len(sizes) > 1                                  # the scale is drawn in the range at each step
    plain = load_datasets(_cfg(tmp_path, "--face_crop_aug_range", "2.0,4.0", "--enable_bucket", "--min_bucket_reso", "64", "--bucket_reso_steps", "32"))[0][0]
    assert not (plain[(0, 0, 0)]["pixels"][0] > 0).any()   # bucket crop at the centre: no face
    state = train(_cfg(tmp_path, "--face_crop_aug_range", "2.0,4.0", "--max_train_steps", "1"))
    assert state.step == 1 and np.isfinite(state.loss)


def test_weighted_captions_train(tmp_path, monkeypatch):
    """--weighted_captions with caption ops and 150 tokens: the loop encodes the captions with their weights (the brackets
    are not tokenized), shuffled with keep_tokens on the weighted text; with cached text-encoder outputs the cache holds
    the weighted conditioning (sd-scripts re-encodes a frozen encoder each step: the same values)."""
    import lora_kit.families.sd as M
    write_folder(tmp_path / "data" / "1_sks", n=2, seed=0)
    for p in (tmp_path / "data" / "1_sks").glob("*.txt"): p.write_text("sks, (red ball:1.5), [grass]")
    seen = []
    def recording(hidden, weights):
        seen.append(weights)
        return apply(hidden, weights)
    apply = M.apply_token_weights
    monkeypatch.setattr(M, "apply_token_weights", recording)
    args = ("--weighted_captions", "--max_token_length", "150", "--shuffle_caption", "--keep_tokens", "1")
    state = train(_cfg(tmp_path, *args))
    assert state.step == 2 and np.isfinite(state.loss) and len(seen) == 2
    assert all(w.shape == (2, 2, 77) and torch.isclose(w, torch.tensor(1.5)).sum() == 2 * 2 and
               torch.isclose(w, torch.tensor(1 / 1.1)).sum() == 2 for w in seen)   # "red ball" and "grass" in each caption
    seen.clear()
    state = train(_cfg(tmp_path, "--weighted_captions", "--cache_text_encoder_outputs", "--network_train_unet_only", "--output_name", "cached"))
    assert state.step == 2 and np.isfinite(state.loss) and len(seen) == 1    # one caching batch, no encoding in the loop
