"""Build the offline CLIP tokenizer files shipped in `lora_kit/assets/clip_tokenizer/`.

Source: `bpe_simple_vocab_16e6.txt.gz` from the open_clip_torch wheel (MIT license), the same BPE
vocabulary OpenAI's CLIP and Stable Diffusion 1.x/2.x use. Usage:
    pip download --no-deps open_clip_torch -d /tmp/oc && unzip -o /tmp/oc/*.whl -d /tmp/oc
    python tools/make_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz lora_kit/assets/clip_tokenizer
"""
import gzip, json, sys
from pathlib import Path


def bytes_to_unicode():
    "GPT-2/CLIP byte-to-printable-character table."
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs: bs.append(b); cs.append(256 + n); n += 1
    return [chr(c) for c in cs]


def main(src, dst):
    merges = gzip.open(src).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    dst = Path(dst); dst.mkdir(parents=True, exist_ok=True)
    (dst / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}, indent=1))
    (dst / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}, indent=1))
    print(f"{len(tokens)} tokens, {len(merges)} merges -> {dst}")


if __name__ == "__main__": main(*sys.argv[1:3])
