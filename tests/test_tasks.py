"""Per-sample loss closures on the packaged models, and check_per_sample catching planted faults."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from zoprivacy import tasks
from zoprivacy.data.poisson import EMPTY_BATCH, PredictableSamplingWarning, poisson_loader
from zoprivacy.tasks import PerSampleViolation, check_per_sample, packaged

torch.set_num_threads(1)

TEXTS = [
    "A gorgeous, witty, seductive movie.",
    "Dull, lifeless and far too long; I nearly walked out before the end.",
    "Fine.",
    "The performances are strong but the script never finds its footing.",
]
LABELS = [1, 0, 1, 0]


@pytest.fixture(scope="module")
def minilm():
    return packaged.load_minilm_classifier(2, seed=0)


@pytest.fixture(scope="module")
def smollm():
    return packaged.load_smollm2()


@pytest.fixture
def tokenizer_side(smollm):
    """Set the SmolLM2 tokenizer's padding side for one test and restore it afterwards."""
    tok = smollm[1]
    original = tok.padding_side

    def set_side(side):
        tok.padding_side = side
        return tok

    yield set_side
    tok.padding_side = original


# --------------------------------------------------------------------------------------------
# sequence classification (MiniLM)
# --------------------------------------------------------------------------------------------


def test_sequence_classification_is_per_sample(minilm):
    model, tok = minilm
    batch = tasks.encode_classification(tok, TEXTS, LABELS, max_length=32)
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # padding is really present
    losses_fn = partial(tasks.sequence_classification_losses, model)
    losses = losses_fn(batch)
    assert losses.shape == (4,) and losses.dtype == torch.float32
    assert not losses.is_inference()
    with torch.inference_mode():
        reference = model(**batch).loss  # HF's batch mean
    assert losses.mean().item() == pytest.approx(reference.item(), abs=1e-6)
    check_per_sample(losses_fn, batch)


def test_check_catches_a_closure_that_ignores_the_attention_mask(minilm):
    model, tok = minilm
    batch = tasks.encode_classification(tok, TEXTS, LABELS, max_length=32)

    def no_mask(b):  # padding tokens are attended to: a record's loss depends on the batch
        return tasks.sequence_classification_losses(
            model, {k: v for k, v in b.items() if k != "attention_mask"}
        )

    with pytest.raises(PerSampleViolation, match=r"record 2 .*alone"):
        check_per_sample(no_mask, batch, check_empty=False)


@pytest.mark.parametrize(
    ("name", "fault"),
    [
        ("batch mean", lambda x: x.mean().expand(x.shape[0])),
        ("centred on the batch mean", lambda x: x - x.mean() + 1.0),
        ("standardised by batch std", lambda x: x / x.std(unbiased=False).clamp(min=1e-3)),
        ("sum over the batch", lambda x: x + x.sum()),
    ],
)
def test_check_catches_closures_that_use_batch_statistics(minilm, name, fault):
    model, tok = minilm
    batch = tasks.encode_classification(tok, TEXTS, LABELS, max_length=32)

    def faulty(b):
        return fault(tasks.sequence_classification_losses(model, b))

    with pytest.raises(PerSampleViolation) as info:
        check_per_sample(faulty, batch, check_empty=False)
    message = str(info.value)
    assert "record" in message and "difference" in message, name


def test_check_catches_wrong_shapes_and_unsupported_empty_batches(minilm):
    model, tok = minilm
    batch = tasks.encode_classification(tok, TEXTS, LABELS, max_length=32)
    with pytest.raises(PerSampleViolation, match="shape"):
        check_per_sample(lambda b: tasks.sequence_classification_losses(model, b).mean(), batch)

    def crashes_on_empty(b):
        assert b, "empty batch"
        return tasks.sequence_classification_losses(model, b)

    with pytest.raises(AssertionError, match="empty batch"):
        check_per_sample(crashes_on_empty, batch)
    with pytest.raises(ValueError, match="at least 2"):
        check_per_sample(partial(tasks.sequence_classification_losses, model), {"x": torch.ones(1)})


def test_check_catches_non_finite_losses():
    batch = {"x": torch.tensor([1.0, 0.0, 2.0])}
    with pytest.raises(PerSampleViolation, match=r"non-finite.*\[1\]"):
        check_per_sample(lambda b: torch.log(b["x"]) if b else torch.zeros(0), batch)


def test_check_passes_a_plain_tensor_closure():
    batch = {"x": torch.randn(6, 3), "labels": torch.arange(6)}
    check_per_sample(lambda b: (b["x"] ** 2).sum(1) if b else torch.zeros(0), batch)


def test_training_mode_is_refused(minilm):
    model, tok = minilm
    batch = tasks.encode_classification(tok, TEXTS[:2], LABELS[:2], max_length=16)
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            tasks.sequence_classification_losses(model, batch)
    finally:
        model.eval()


# --------------------------------------------------------------------------------------------
# prompt classification and causal-LM targets (SmolLM2)
# --------------------------------------------------------------------------------------------


def full_lm_logits(model, batch):
    """The causal LM's full ``[B, L, vocab]`` logits, positions counted over real tokens."""
    mask = batch["attention_mask"]
    with torch.inference_mode():
        return model(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        ).logits


def full_logits_prompt_reference(model, batch, label_ids):
    """The straightforward (wasteful) computation: full logits, then pick the answer position."""
    logits = full_lm_logits(model, batch)
    pos = tasks.answer_positions(batch["attention_mask"])
    picked = logits[torch.arange(len(pos)), pos][:, label_ids]
    return F.cross_entropy(picked.double(), batch["labels"], reduction="none")


@pytest.mark.parametrize("side", ["right", "left"])
def test_prompt_classification_is_per_sample(smollm, tokenizer_side, side):
    model, _ = smollm
    tok = tokenizer_side(side)
    batch, label_ids = tasks.encode_prompts(tok, TEXTS, LABELS)
    assert label_ids == [
        tok.convert_tokens_to_ids("Ġnegative"),
        tok.convert_tokens_to_ids("Ġpositive"),
    ]
    column = 0 if side == "left" else -1
    assert (batch["attention_mask"][:, column] == 0).any()  # padding on the chosen side
    losses_fn = partial(tasks.prompt_classification_losses, model, label_token_ids=label_ids)
    losses = losses_fn(batch)
    assert losses.shape == (4,) and torch.isfinite(losses).all()
    reference = full_logits_prompt_reference(model, batch, label_ids)
    torch.testing.assert_close(losses.double(), reference, atol=1e-4, rtol=1e-4)
    check_per_sample(losses_fn, batch)


def test_prompt_losses_do_not_depend_on_the_padding_side(smollm, tokenizer_side):
    model, _ = smollm
    right, ids = tasks.encode_prompts(tokenizer_side("right"), TEXTS, LABELS)
    left, _ = tasks.encode_prompts(tokenizer_side("left"), TEXTS, LABELS)
    losses_fn = partial(tasks.prompt_classification_losses, model, label_token_ids=ids)
    torch.testing.assert_close(losses_fn(left), losses_fn(right), atol=1e-4, rtol=1e-4)


def test_public_label_word_helpers_match_the_full_lm_head(smollm):
    """answer_hidden_states + lm_head_logits are the full model's logits at the answer position."""
    model, tok = smollm
    batch, ids = tasks.encode_prompts(tok, TEXTS, LABELS)
    decoder, head = tasks.decoder_and_head(model)
    assert decoder is model.model and head is model.lm_head
    full = full_lm_logits(model, batch)
    with torch.inference_mode():
        answer = tasks.answer_hidden_states(model, batch)
        picked = tasks.lm_head_logits(model, answer, torch.tensor(ids))
    pos = tasks.answer_positions(batch["attention_mask"])
    torch.testing.assert_close(picked, full[torch.arange(4), pos][:, ids], atol=1e-4, rtol=1e-4)
    assert tasks.class_labels(batch, 2, torch.device("cpu")).tolist() == LABELS
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        tasks.class_labels(batch, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="shape \\[B\\]"):
        tasks.class_labels({"labels": torch.zeros(2, 2)}, 2, torch.device("cpu"))


def test_per_record_losses_frame(minilm):
    """The frame: empty batch -> no call; training mode refused; an ordinary tensor back."""
    model, _ = minilm
    calls = []

    def compute(device, dtype):
        calls.append((device, dtype))
        return torch.arange(3.0, dtype=torch.float64)

    assert tasks.per_record_losses(model, EMPTY_BATCH, compute).numel() == 0 and not calls
    out = tasks.per_record_losses(model, {"labels": torch.zeros(3)}, compute)
    assert calls == [(torch.device("cpu"), torch.float32)]
    assert out.dtype == torch.float32 and not out.is_inference() and out.tolist() == [0, 1, 2]
    model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            tasks.per_record_losses(model, {"labels": torch.zeros(3)}, compute)
    finally:
        model.eval()


@pytest.mark.parametrize("side", ["right", "left"])
def test_causal_lm_target_losses_are_per_sample(smollm, tokenizer_side, side):
    model, _ = smollm
    tok = tokenizer_side(side)
    prompts = [f"Review: {t}\nSentiment:" for t in TEXTS]
    targets = [" positive" if y else " negative" for y in LABELS]
    batch = tasks.encode_causal_lm(tok, prompts, targets)
    losses_fn = partial(tasks.causal_lm_target_losses, model)
    losses = losses_fn(batch)
    assert losses.shape == (4,)
    labels = batch["labels"]
    logits = full_lm_logits(model, batch)
    token = F.cross_entropy(
        logits[:, :-1].double().transpose(1, 2), labels[:, 1:], reduction="none"
    )
    answer = labels[:, 1:] != -100
    reference = (token * answer).sum(1) / answer.sum(1)
    torch.testing.assert_close(losses.double(), reference, atol=1e-4, rtol=1e-4)
    check_per_sample(losses_fn, batch)


def test_causal_lm_rejects_records_without_answer(smollm):
    model, tok = smollm
    batch = tasks.encode_causal_lm(tok, ["a", "b"], [" x", " y"])
    batch["labels"][1] = -100
    with pytest.raises(ValueError, match=r"records \[1\] have no answer"):
        tasks.causal_lm_target_losses(model, batch)


@pytest.mark.parametrize(
    "fn",
    [
        tasks.sequence_classification_losses,
        partial(tasks.prompt_classification_losses, label_token_ids=[1, 2]),
        tasks.causal_lm_target_losses,
    ],
    ids=["sequence", "prompt", "causal"],
)
def test_empty_batches_give_empty_losses_without_a_forward(fn):
    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, *args, **kwargs):
            raise AssertionError("no forward pass for an empty batch")

    model = Exploding().eval()
    for empty in (EMPTY_BATCH, {}, {"input_ids": torch.zeros(0, 5, dtype=torch.long)}):
        out = fn(model, empty)
        assert out.shape == (0,) and out.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# encoders and the loader pipeline
# --------------------------------------------------------------------------------------------


def test_label_words_must_be_single_tokens(smollm):
    _, tok = smollm
    with pytest.raises(ValueError, match=r"'incomprehensibly'.* tokens"):
        tasks.encode_prompts(tok, TEXTS, LABELS, label_words=(" good", "incomprehensibly"))
    with pytest.raises(ValueError, match="distinct"):
        tasks.label_token_ids(tok, [" good", " good"])
    with pytest.raises(ValueError, match="labels"):
        tasks.encode_prompts(tok, TEXTS, [0, 1, 2, 0])


def test_prompt_truncation_shortens_the_text_not_the_template(smollm):
    _, tok = smollm
    long_text = "an endless, meandering story " * 40
    batch, _ = tasks.encode_prompts(tok, [long_text, "short"], [0, 1], max_length=24)
    assert batch["input_ids"].shape[1] <= 24
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    assert tok.decode(first).endswith("\nSentiment:")
    assert tok.decode(first).startswith("Review: an endless")


def test_trim_padding_and_select_records(minilm):
    _, tok = minilm
    batch = tasks.encode_classification(tok, TEXTS, LABELS, max_length=32)
    short = tasks.select_records(batch, [2])  # "Fine." is much shorter than the others
    assert short["input_ids"].shape == (1, int(batch["attention_mask"][2].sum()))
    assert short["labels"].tolist() == [1]
    assert tasks.batch_size_of(batch) == 4 and tasks.batch_size_of(EMPTY_BATCH) == 0


def test_poisson_loader_pipeline_with_trimmed_collate(minilm):
    model, tok = minilm
    encoded = tasks.encode_classification(tok, TEXTS * 3, LABELS * 3, max_length=32)
    dataset = tasks.TensorDictDataset(encoded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PredictableSamplingWarning)
        loader = poisson_loader(
            dataset, 0.2, steps=8, collate_fn=tasks.collate_trimmed, generator=11
        )
    losses_fn = partial(tasks.sequence_classification_losses, model)
    sizes = []
    for batch in loader:
        losses = losses_fn(batch)
        sizes.append(losses.shape[0])
        if batch:
            assert batch["attention_mask"][:, -1].any()  # trimmed to the longest record
            assert losses.shape[0] == batch["labels"].shape[0]
    assert len(sizes) == 8 and sum(sizes) > 0


def test_training_mode_can_be_allowed_explicitly(minilm):
    model, tok = minilm
    batch = tasks.encode_classification(tok, TEXTS[:2], LABELS[:2], max_length=16)
    model.train()
    try:
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            runs.append(tasks.sequence_classification_losses(model, batch, allow_training=True))
    finally:
        model.eval()
    evaluated = tasks.sequence_classification_losses(model, batch)
    # The model really ran in training mode (dropout active: other losses than in eval mode),
    # with its randomness from the torch RNG (the same seed gives the same losses).
    assert runs[0].shape == (2,) and torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], evaluated)


def test_end_to_end_with_the_optimizer_and_accountant(minilm):
    """Size release -> Poisson loader (with empty batches) -> closures -> DP-AggZO steps."""
    try:
        from zoprivacy import DPAggZO
    except ImportError:
        from zoprivacy.optim.optimizer import DPAggZO
    from zoprivacy.accounting import RDPAccountant
    from zoprivacy.data.poisson import expected_batch_size, release_size

    model, tok = minilm
    head = model.classifier
    saved = {k: v.clone() for k, v in head.state_dict().items()}
    encoded = tasks.encode_classification(tok, TEXTS * 2, LABELS * 2, max_length=24)
    dataset = tasks.TensorDictDataset(encoded)
    q, steps = 0.15, 6
    accountant = RDPAccountant()
    noisy_size = release_size(len(dataset), 5.0, accountant=accountant)
    with pytest.raises(RuntimeError, match="already released"):
        release_size(len(dataset), 5.0, accountant=accountant)
    for p in model.parameters():
        p.requires_grad_(False)
    head.requires_grad_(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # seeded noise / sampling: test only
            loader = poisson_loader(
                dataset, q, steps=steps, collate_fn=tasks.collate_trimmed, generator=5
            )
            opt = DPAggZO(
                head.parameters(),
                lr=1e-2,
                num_directions=3,
                clip_norm=1.0,
                noise_multiplier=1.0,
                expected_batch_size=expected_batch_size(q, noisy_size),
                seed=0,
                noise_seed=0,
                accountant=accountant,
                sample_rate=q,
            )
            sizes = []
            for batch in loader:
                stats = opt.step(lambda b=batch: tasks.sequence_classification_losses(model, b))
                sizes.append(stats.batch_size)
                assert stats.noisy_sum.shape == (3,)
        assert 0 in sizes and len(sizes) == steps  # empty batches were real steps
        assert accountant.get_epsilon(1e-5) > 0
        assert not torch.equal(head.weight, saved["weight"])
    finally:
        head.load_state_dict(saved)
        for p in model.parameters():
            p.requires_grad_(True)


def test_check_per_sample_on_tuple_batches():
    from collections import namedtuple

    Pair = namedtuple("Pair", "x y")
    losses = lambda b: ((b[0] - b[1]) ** 2).sum(1) if b else torch.zeros(0)  # noqa: E731
    x, y = torch.randn(5, 2), torch.randn(5, 2)
    for batch in ((x, y), [x, y], Pair(x, y)):
        check_per_sample(losses, batch)
    chosen = tasks.select_records(Pair(x, y), [1, 3])
    assert (
        type(chosen) is Pair
        and torch.equal(chosen.x, x[[1, 3]])
        and torch.equal(chosen.y, y[[1, 3]])
    )
