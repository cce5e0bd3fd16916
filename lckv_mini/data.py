"""Data: tiny Shakespeare (downloaded atomically and cached), tokenizers, token caches, batches."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CACHE_ENV = "LCKV_CACHE_DIR"


class DataError(RuntimeError):
    """Data that cannot be had or used; the message says what to do."""


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where downloads and token caches live: `path`, else $LCKV_CACHE_DIR, else
    ~/.cache/lckv_mini."""
    chosen = path or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lckv_mini"
    return Path(chosen).expanduser()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it


def atomic_write(dest: Path, write) -> None:
    """Call write(file) on a temporary file beside dest, then rename it over dest: a reader sees
    the old file or the whole new one, never a part. The file and its folder are fsynced, so
    the rename survives a crash; on any error the temporary file is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp's 0600 would hide the file from the group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_folder(dest.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_folder(folder: Path) -> None:
    """Make the renames inside `folder` durable: a rename is an entry of the folder, which a
    crash can lose until the folder itself is synced."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(dest: Path, data: bytes) -> None:
    atomic_write(dest, lambda f: f.write(data))


def download(url: str, dest: Path, sha256: str, timeout: float = 30.0) -> Path:
    """Fetch url to dest unless a copy with the right hash is already there.

    The bytes are checked against sha256 before the rename, so a half or wrong file is never
    left where a later run would trust it.
    """
    if dest.exists() and sha256_of(dest) == sha256:
        return dest
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except OSError as e:
        raise DataError(
            f"could not download {url} ({e}). Offline? Put a copy of the file at {dest} "
            f"(or set ${CACHE_ENV} / --cache-dir to a folder holding {dest.name}), or train on "
            "a local text file with --data PATH.") from e
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise DataError(f"{url} has sha256 {got}, expected {sha256}; nothing was written")
    atomic_write_bytes(dest, data)
    return dest


def shakespeare_path(cache: str | os.PathLike | None = None) -> Path:
    """The tiny Shakespeare corpus, downloaded into the cache directory on first use."""
    return download(SHAKESPEARE_URL, cache_dir(cache) / "tinyshakespeare.txt", SHAKESPEARE_SHA256)


def read_text(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"data file {path} is empty")
    return text


# ----------------------------------------------------------------------------------------------
# Tokenizers: each is a small object that round-trips through a plain dict (kept in checkpoints).


def gpt2_encoding():
    """tiktoken's GPT-2 BPE (r50k_base). Offline it needs the BPE file in $TIKTOKEN_CACHE_DIR."""
    import tiktoken
    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:  # tiktoken raises several kinds when it cannot fetch its file
        raise DataError(
            f"tiktoken could not load the GPT-2 BPE (r50k_base): {e}. Offline, copy the file "
            "r50k_base.tiktoken into a folder named by $TIKTOKEN_CACHE_DIR under the name "
            "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4, or use --tokenizer char.") from e


def hf_tokenizer(hf_json: str):
    """A `tokenizers` tokenizer from the text of a tokenizer.json (an optional dependency)."""
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("a Hugging Face tokenizer (tokenizer.json) needs the `tokenizers` "
                          "package: pip install lckv-mini[pretrained]") from e
    return tokenizers.Tokenizer.from_str(hf_json)


class Tokenizer:
    """kind "gpt2": tiktoken's GPT-2 BPE, optionally compacted to the ids the corpus uses
    (`ids[i]` is the GPT-2 id of compact id i); kind "char": one id per character; kind "hf": a
    pretrained model's tokenizer.json, whose whole text `hf_json` is kept (and so travels in
    checkpoints). Text is encoded without special tokens (no BOS): the corpus is one stream."""

    KINDS = ("gpt2", "char", "hf")

    def __init__(self, kind: str, ids: list[int] | None = None, chars: str | None = None,
                 hf_json: str | None = None):
        if kind not in self.KINDS:
            raise ValueError(f"unknown tokenizer {kind!r}; expected one of {self.KINDS}")
        self.kind, self.ids, self.chars, self.hf_json = kind, ids, chars, hf_json
        if kind == "gpt2":
            self.enc = gpt2_encoding()
            self.to_compact = {g: i for i, g in enumerate(ids)} if ids is not None else None
        elif kind == "hf":
            if not hf_json:
                raise ValueError("an hf tokenizer needs the text of its tokenizer.json")
            self.hf = hf_tokenizer(hf_json)
        else:
            if not chars:
                raise ValueError("a char tokenizer needs its characters")
            self.stoi = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def fit(cls, kind: str, text: str, compact: bool = True) -> Tokenizer:
        """Build a tokenizer for this corpus (the compact GPT-2 map, or the character set)."""
        if kind == "char":
            return cls("char", chars="".join(sorted(set(text))))
        if kind == "gpt2":
            if not compact:
                return cls("gpt2")
            used = np.unique(np.asarray(gpt2_encoding().encode_ordinary(text), dtype=np.int64))
            return cls("gpt2", ids=[int(i) for i in used])
        raise ValueError(f"unknown tokenizer {kind!r}; expected 'gpt2' or 'char'")

    @property
    def vocab_size(self) -> int:
        if self.kind == "char":
            return len(self.chars)
        if self.kind == "hf":
            return self.hf.get_vocab_size(with_added_tokens=True)
        return len(self.ids) if self.ids is not None else self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        if self.kind == "char":
            missing = sorted(set(text) - set(self.stoi))
            if missing:
                raise ValueError(f"characters {missing[:10]} are not in the vocabulary")
            return [self.stoi[ch] for ch in text]
        if self.kind == "hf":
            return self.hf.encode(text, add_special_tokens=False).ids
        ids = self.enc.encode_ordinary(text)
        if self.to_compact is None:
            return ids
        try:
            return [self.to_compact[i] for i in ids]
        except KeyError as e:
            piece = self.enc.decode([e.args[0]])
            raise ValueError(f"token {piece!r} never occurs in the training corpus, so the "
                             "compact vocabulary has no id for it") from None

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "char":
            return "".join(self.chars[i] for i in ids)
        if self.kind == "hf":
            return self.hf.decode(ids, skip_special_tokens=False)
        if self.ids is not None:
            ids = [self.ids[i] for i in ids]
        return self.enc.decode(ids)

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "ids": self.ids, "chars": self.chars}
        if self.kind == "hf":  # only then, so that the other kinds' dicts (and caches) stay as were
            d["hf_json"] = self.hf_json
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        return cls(d["kind"], ids=d.get("ids"), chars=d.get("chars"), hf_json=d.get("hf_json"))


# ----------------------------------------------------------------------------------------------
# Token caches and batches


def tokenize_cached(text: str, tokenizer: Tokenizer, cache: str | os.PathLike | None = None
                    ) -> np.ndarray:
    """Token ids of text as a read-only memmap, cached on disk by (text hash, tokenizer), so the
    second run starts at once."""
    meta = repr(sorted(tokenizer.to_dict().items())).encode()
    key = hashlib.sha256(text.encode() + b"\0" + meta).hexdigest()[:20]
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    path = cache_dir(cache) / "tokens" / f"{key}.{np.dtype(dtype).name}"
    if not path.exists():
        ids = np.asarray(tokenizer.encode(text), dtype=dtype)
        atomic_write_bytes(path, ids.tobytes())
    return np.memmap(path, dtype=dtype, mode="r")


def split(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The customary split for this corpus: the first 90% trains, the last 10% validates."""
    n = int(len(ids) * (1 - val_fraction))
    return ids[:n], ids[n:]


def get_batch(ids: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
              device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: x (B, T) and the next tokens y (B, T)."""
    if len(ids) <= block_size:
        raise DataError(f"the data ({len(ids)} tokens) is not longer than block_size="
                        f"{block_size}; use a smaller --block-size or more data")
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)
    rows = [torch.from_numpy(ids[s:s + block_size + 1].astype(np.int64)) for s in starts.tolist()]
    xy = torch.stack(rows)
    return xy[:, :-1].to(device), xy[:, 1:].to(device)
