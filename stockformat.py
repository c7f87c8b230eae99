"""Text-encoder folders in the one form that every stock loader reads the same way.

Every pipeline folder pocketdiff writes must load with a plain `from_pretrained(path)` under
transformers 4 and 5 alike, and generate. Three things in a transformers folder break that:

- transformers 5 saves `CLIPTextModel` weights without the `text_model.` prefix; transformers 4
  finds none of its keys and silently builds a random text encoder. The prefixed keys are what
  every published SD checkpoint has, and transformers 5 strips the prefix on load.
- transformers 5 loads in the dtype `config.json` names, while diffusers loads UNet and VAE in
  float32 whatever their files hold: a `"dtype": "float16"` text encoder then feeds half-precision
  states into a float32 UNet and the first matmul fails. Weights may stay fp16 on disk; the
  config says float32, so every loader computes in float32.
- transformers 5 saves a CLIP tokenizer as `tokenizer.json` alone; transformers 4's `CLIPTokenizer`
  (the class `model_index.json` names) reads CLIP's `vocab.json` and `merges.txt`, as do Apple's
  Swift tokenizer and our exported runtimes.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

PREFIXED_CLASSES = {"CLIPTextModel": "text_model."}  # the classes whose files transformers 5 writes unprefixed
FLOAT32 = "float32"


def _prefixed(keys, prefix: str) -> dict[str, str]:
    """Old key → stock key: the prefix added where missing (a projection beside the text model keeps its name)."""
    return {key: key if key.startswith(prefix) or key.startswith("text_projection.") else prefix + key for key in keys}


def _rewrite_weights(folder: Path, prefix: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    for name in files:
        path = folder / name
        if not path.exists():
            continue
        with safe_open(str(path), framework="pt") as handle:
            renames = _prefixed(handle.keys(), prefix)
            if all(old == new for old, new in renames.items()):
                continue
            tensors = {renames[key]: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {"format": "pt"}
        save_file(tensors, str(path), metadata=metadata)
    if index:
        index["weight_map"] = {_prefixed([key], prefix)[key]: file for key, file in index["weight_map"].items()}
        index_file.write_text(json.dumps(index, indent=2))


def vocab_and_merges(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """From CLIP's `vocab.json` + `merges.txt`, or from `tokenizer.json` (what transformers 5 saves)."""
    folder = Path(folder)
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return json.loads((folder / "vocab.json").read_text(encoding="utf-8")), merges
    if (folder / "tokenizer.json").exists():
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        return model["vocab"], [tuple(m.split() if isinstance(m, str) else m) for m in model["merges"]]
    raise UserError(f"{folder}: no CLIP tokenizer files (vocab.json + merges.txt, or tokenizer.json)")


def write_vocab_and_merges(folder: Path, dest: Path) -> None:
    """CLIP's two files, the form Apple's Swift tokenizer reads, whatever form `folder` holds."""
    vocab, merges = vocab_and_merges(folder)
    (Path(dest) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (Path(dest) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                           encoding="utf-8")


def make_stock_text_encoder(folder: Path, class_name: str) -> None:
    """Rewrite one transformers component folder in place: stock key names, float32 in its config."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.exists():
        return
    config = json.loads(config_file.read_text())
    changed = config.get("dtype") != FLOAT32 or config.get("torch_dtype", FLOAT32) != FLOAT32
    config["dtype"] = FLOAT32
    if "torch_dtype" in config:
        config["torch_dtype"] = FLOAT32
    if changed:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if class_name in PREFIXED_CLASSES:
        _rewrite_weights(folder, PREFIXED_CLASSES[class_name])


def make_stock_pipeline(folder: Path) -> None:
    """Every transformers component of a pipeline folder in its stock form: text encoders as above, CLIP
    tokenizers with `vocab.json` and `merges.txt` beside whatever else they hold."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    for name, spec in index.items():
        if not (isinstance(spec, list) and spec[0] == "transformers" and (folder / name).is_dir()):
            continue
        if spec[1].startswith("CLIPTokenizer"):
            if not ((folder / name / "vocab.json").exists() and (folder / name / "merges.txt").exists()):
                write_vocab_and_merges(folder / name, folder / name)
        else:
            make_stock_text_encoder(folder / name, spec[1])
