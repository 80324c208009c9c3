"""Shared-prefix caching: run the frozen bottom of a model once per batch, not 2K times.

When only the top of a transformer is trainable (the head, the last N layers, LoRA adapters in
the last layers), every one of the 2K perturbed evaluations of a DP-AggZO step computes the same
hidden states up to the first trainable layer. :class:`PrefixCache` wraps a per-record loss
function so that, for a given batch, the first call runs the whole model and keeps the output of
the last frozen layer, and every later call with the same batch skips the embeddings and the
frozen layers and runs only the trainable suffix::

    cache = PrefixCache(model)                     # finds the layer stack and the first trainable
    losses = cache.wrap(functools.partial(tasks.sequence_classification_losses, model))
    opt.step(lambda: losses(batch))                # 1 full forward + 2K − 1 suffix forwards

The same cache serves a whole data set when the frozen layers never change during training
(the ``zoprivacy finetune`` job): :meth:`PrefixCache.features` runs the prefix once over all
records and keeps its output per record, and :meth:`PrefixCache.run_from` then runs only the
trainable suffix of a batch from those rows, so not even the first evaluation of a step runs the
frozen layers::

    feats = cache.features(logits_fn, encoded)     # once: {"hidden", "input_ids", ...}
    logits = cache.run_from(feats["hidden"][rows], logits_fn, inputs_of_rows)

How: the wrapped function is called as usual; on a cache hit, the ``forward`` of the embedding
block and of every frozen layer is temporarily replaced by one that returns the cached output
of the last frozen layer (the attention masks, rotary embeddings and everything after the frozen
layers still run normally). Losses are therefore exactly those of the full model, record by
record: the prefix output of record i depends on record i alone (the same attention masks are
used), which :func:`zoprivacy.tasks.check_per_sample` confirms on the wrapped function
(``tests/test_prefix.py``).

Rules: the model must be in eval mode (dropout in the prefix would otherwise be drawn once and
reused, and the RNG replay of the optimizer would not line up); the embedding block and the
layers below the first trainable one must have no trainable tensor (a tied weight is one tensor:
with a trainable tied LM head the embeddings are trainable and nothing is cached); the cache is
keyed on the batch's identity and the identity, storage, version counter and shape of its
tensors, so a new or modified batch is recomputed. Frozen tensors must not change while a batch
is cached (call :meth:`PrefixCache.clear` after changing them).

:class:`LabelWordHead` makes the prompt-classification setup of SmolLM2 cacheable: a trainable
copy of the LM head's label-word rows (C × H), so that the tied embedding stays frozen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoprivacy.tasks.losses import (
    answer_hidden_states,
    class_labels,
    decoder_and_head,
    per_record_losses,
)

__all__ = ["LabelWordHead", "PrefixCache", "find_embeddings", "find_layers"]


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer's layer stack: the ModuleList of identical blocks with most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no ModuleList of layers to cache")
    return best[1], best[2]


def find_embeddings(model: nn.Module, layers_name: str) -> tuple[str, nn.Module]:
    """The module that turns the inputs into the first layer's input (e.g. ``bert.embeddings``).

    It is the ancestor of ``model.get_input_embeddings()`` that is a sibling of the branch
    holding the layers (``bert.embeddings`` next to ``bert.encoder.layer``; for Llama
    ``model.embed_tokens`` next to ``model.layers``).
    """
    get = getattr(model, "get_input_embeddings", None)
    target = get() if callable(get) else None
    if not isinstance(target, nn.Module):
        raise ValueError(f"{type(model).__name__} has no get_input_embeddings()")
    names = {id(m): n for n, m in model.named_modules()}
    emb_name = names.get(id(target))
    if emb_name is None:
        raise ValueError("the input embeddings are not a submodule of the model")
    emb_parts, layer_parts = emb_name.split("."), layers_name.split(".")
    common = 0
    while (
        common < min(len(emb_parts), len(layer_parts)) and emb_parts[common] == layer_parts[common]
    ):
        common += 1
    block_name = ".".join(emb_parts[: common + 1])
    return block_name, model.get_submodule(block_name)


def _fingerprint(batch: Any) -> tuple[Any, ...]:
    def one(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return (id(value), value.data_ptr(), value._version, tuple(value.shape))
        return id(value)

    if isinstance(batch, Mapping):
        items = tuple((k, one(v)) for k, v in batch.items())
    elif isinstance(batch, list | tuple):
        items = tuple(one(v) for v in batch)
    else:
        items = (one(batch),)
    return (id(batch), items)


def _sequence_inputs(block: Mapping[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    """The block's tensors shaped like the hidden states' ``[B, L]`` (``labels`` aside)."""
    return {
        k: v
        for k, v in block.items()
        if k != "labels" and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[:2] == shape
    }


def _cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate blocks along the records, right-padding dimension 1 with zeros to the longest
    (``[b, L_i, ...]`` hidden states, ``[b, L_i]`` masks and ids; equal lengths: no padding)."""
    if parts[0].dim() < 2:
        return torch.cat(parts)
    length = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, 0) * (p.dim() - 2) + (0, length - p.shape[1])) for p in parts])


class PrefixCache:
    """Caches the frozen prefix (embeddings + layers below the first trainable one) per batch.

    Args:
        model: the (possibly PEFT-wrapped) transformer, in eval mode.
        layers: the layer stack (default: :func:`find_layers`).
        embeddings: the module computing the first layer's input (default:
            :func:`find_embeddings`).

    Attributes:
        first_trainable: index of the first layer with a trainable tensor (``len(layers)`` when
            none is trainable); 0 means nothing can be cached (``enabled`` is False).
        hits, misses: calls served from the cache and calls that ran the whole model.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: nn.ModuleList | None = None,
        embeddings: nn.Module | None = None,
    ) -> None:
        self.model = model
        if layers is None:
            layers_name, layers = find_layers(model)
        else:
            layers_name = next((n for n, m in model.named_modules() if m is layers), "")
        if embeddings is None:
            _, embeddings = find_embeddings(model, layers_name)
        self.layers = layers
        self.embeddings = embeddings
        self.first_trainable = self._first_trainable()
        self.hits = 0
        self.misses = 0
        self._key: tuple[Any, ...] | None = None
        self._batch: Any = None
        self._output: Any = None
        self._tuple_output = False  # the layers return tuples (older transformers)

    def _first_trainable(self) -> int:
        if any(p.requires_grad for p in self.embeddings.parameters()):
            return 0
        for i, layer in enumerate(self.layers):
            if any(p.requires_grad for p in layer.parameters()):
                return i
        return len(self.layers)

    @property
    def enabled(self) -> bool:
        """True when at least one layer (or the embeddings) lies in the frozen prefix."""
        return self.first_trainable > 0

    @property
    def num_cached_layers(self) -> int:
        """Layers skipped on a cache hit (besides the embeddings)."""
        return self.first_trainable

    def clear(self) -> None:
        """Forget the cached batch (e.g. after changing frozen weights)."""
        self._key = self._batch = self._output = None

    def refresh(self) -> None:
        """Re-read which tensors are trainable (after changing ``requires_grad``) and clear."""
        self.first_trainable = self._first_trainable()
        self.clear()

    def wrap(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``fn(batch, *args, **kwargs)`` with the prefix cached per batch."""

        def cached(batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self.call(fn, batch, *args, **kwargs)

        cached.__wrapped__ = fn  # type: ignore[attr-defined]
        return cached

    def call(self, fn: Callable[..., torch.Tensor], batch: Any, *args: Any, **kwargs: Any):
        """Run ``fn(batch, ...)``, from the cached prefix when ``batch`` is the cached one."""
        if not self.enabled:
            return fn(batch, *args, **kwargs)
        self._require_eval()
        key = _fingerprint(batch)
        if key == self._key and self._output is not None:
            self.hits += 1
            with self._short_circuit(self._output):
                return fn(batch, *args, **kwargs)
        self.clear()
        with self._capturing() as captured:
            out = fn(batch, *args, **kwargs)
        self.misses += 1
        if len(captured) == 1:  # the model ran once on this batch: cache its prefix
            self._key, self._batch, self._output = key, batch, captured[0]
        return out

    # ------------------------------------------------------------ precomputed prefix outputs
    def prefix_output(
        self, fn: Callable[..., Any], batch: Any, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """The frozen prefix's output for ``batch``: the hidden states entering the first
        trainable layer (``[B, L, H]``; the last layer's output when only a head above the
        layers is trainable).

        Runs ``fn(batch, ...)`` once under ``torch.inference_mode()`` (``fn`` must run the
        model's forward on ``batch``, e.g. a loss or logits function) and returns an ordinary
        tensor. Nothing is kept: see :meth:`features` for a whole set of records.

        Raises:
            RuntimeError: nothing is frozen (:attr:`enabled` is False), or the model did not run
                exactly once.
            ValueError: the model is in training mode.
        """
        self._require_prefix()
        self._require_eval()
        with torch.inference_mode(), self._capturing() as captured:
            fn(batch, *args, **kwargs)
        if len(captured) != 1:
            raise RuntimeError(
                f"layer {self.first_trainable - 1} ran {len(captured)} times in fn, expected 1"
            )
        output = captured[0]
        self._tuple_output = isinstance(output, tuple | list)
        return (output[0] if self._tuple_output else output).clone()

    def features(
        self,
        fn: Callable[[dict[str, Any]], Any],
        records: Mapping[str, torch.Tensor],
        *,
        batch_size: int = 32,
        select: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The frozen prefix's output for a set of encoded records, computed once (no autograd).

        The records run through ``fn`` in blocks of ``batch_size``, each cut to its own longest
        record (:func:`zoprivacy.tasks.trim_padding`); a record's prefix output depends on that
        record alone, so the result is the same for any block size.

        Args:
            fn: runs the model on a block (a dict of ``records``' rows), e.g. a logits function.
            records: encoded records (dict of tensors, one row per record).
            batch_size: records per forward pass.
            select: ``select(hidden, block)`` keeps, per record, what the trainable top reads
                (e.g. the answer position's state when only a head is trainable).

        Returns:
            With ``select``: ``{"hidden": select(...)}``. Without: ``{"hidden": [N, L, H]}``
            plus the records' sequence-shaped inputs (``input_ids``, ``attention_mask``, ...;
            not ``labels``), right-padded to the common length ``L``: give rows of it with
            :meth:`run_from` to run only the trainable suffix.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        from zoprivacy.tasks.encoding import trim_padding

        n = next(iter(records.values())).shape[0]
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, n, batch_size):
            block = trim_padding({k: v[start : start + batch_size] for k, v in records.items()})
            hidden = self.prefix_output(fn, block)
            if select is not None:
                with torch.inference_mode():
                    chosen = select(hidden, block)
                found = {"hidden": chosen.clone()}  # outside inference mode: an ordinary tensor
            else:
                found = {"hidden": hidden, **_sequence_inputs(block, hidden.shape[:2])}
            for key, value in found.items():
                parts.setdefault(key, []).append(value)
        return {key: _cat_padded(values) for key, values in parts.items()}

    def run_from(
        self, hidden: torch.Tensor, fn: Callable[..., Any], batch: Any, *args: Any, **kwargs: Any
    ) -> Any:
        """``fn(batch, ...)`` with the frozen prefix's output replaced by ``hidden``.

        ``hidden`` holds the batch's records' prefix output (rows of :meth:`features` without
        ``select``, or :meth:`prefix_output`), and ``batch`` their inputs (``input_ids``,
        ``attention_mask``, of the same length): the embeddings and the frozen layers return
        ``hidden`` instead of running; masks, positions and the trainable layers run as usual.
        Runs in the caller's grad mode and model mode (the trainable top may use dropout).
        """
        self._require_prefix()
        output = (hidden,) if self._tuple_output else hidden
        with self._short_circuit(output):
            return fn(batch, *args, **kwargs)

    def _require_prefix(self) -> None:
        if not self.enabled:
            raise RuntimeError(
                "no frozen prefix: the embeddings or the first layer are trainable (nothing "
                "below the first trainable layer to precompute)"
            )

    def _require_eval(self) -> None:
        if self.model.training:
            raise ValueError(
                "PrefixCache needs the model in eval mode (model.eval()): dropout in the frozen "
                "prefix would be drawn once and reused across the perturbed evaluations"
            )

    @contextlib.contextmanager
    def _capturing(self) -> Iterator[list[Any]]:
        """Collect the outputs of the last frozen layer while the block runs."""
        captured: list[Any] = []

        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output)

        handle = self.layers[self.first_trainable - 1].register_forward_hook(keep)
        try:
            yield captured
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _short_circuit(self, output: Any) -> Iterator[None]:
        hidden = output[0] if isinstance(output, tuple | list) else output
        replaced: list[nn.Module] = []

        def make(value: Any) -> Callable[..., Any]:
            def forward(*_args: Any, **_kwargs: Any) -> Any:
                return value

            return forward

        try:
            self.embeddings.forward = make(hidden)  # type: ignore[method-assign]
            replaced.append(self.embeddings)
            for layer in self.layers[: self.first_trainable]:
                layer.forward = make(output)  # type: ignore[method-assign]
                replaced.append(layer)
            yield
        finally:
            for module in replaced:
                if "forward" in module.__dict__:
                    del module.forward


class LabelWordHead(nn.Module):
    """A trainable copy of a causal LM's label-word rows: logits over C classes, not the vocabulary.

    Prompt classification with a tied LM head (SmolLM2) reads ``lm_head.weight[label_ids]``,
    which *is* the embedding matrix: training it makes the embeddings trainable and defeats
    prefix caching. This head copies those C rows into its own ``weight`` (C × H) and computes
    the same per-record losses as :func:`zoprivacy.tasks.prompt_classification_losses` (equal
    at initialisation), so the embeddings can stay frozen.

    Args:
        model: the causal LM (its final norm and decoder are used as they are).
        label_token_ids: one vocabulary id per class.
    """

    def __init__(self, model: nn.Module, label_token_ids: Sequence[int] | torch.Tensor) -> None:
        super().__init__()
        _, head = decoder_and_head(model)
        rows = torch.as_tensor(label_token_ids, dtype=torch.long).flatten()
        with torch.no_grad():
            self.weight = nn.Parameter(head.weight[rows.to(head.weight.device)].detach().clone())
        bias = getattr(head, "bias", None)
        self.bias = (
            None if bias is None else nn.Parameter(bias[rows.to(bias.device)].detach().clone())
        )
        self.softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight, self.bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def losses(
        self, model: nn.Module, batch: Mapping[str, Any], *, allow_training: bool = False
    ) -> torch.Tensor:
        """Per-record cross-entropy over the C label words at each record's answer position.

        The same computation as :func:`zoprivacy.tasks.prompt_classification_losses`, with this
        head's ``weight`` (and ``bias``) in place of the LM head's label-word rows.
        """

        def compute(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
            labels = class_labels(batch, self.weight.shape[0], device)
            logits = self(answer_hidden_states(model, batch))
            return F.cross_entropy(logits.to(dtype), labels, reduction="none")

        return per_record_losses(model, batch, compute, allow_training=allow_training)
