"""The per-step objective: supervised-position logits, the pretraining LM term, and the chunked path's limits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distillm import IGNORE_INDEX
from distillm.config import ObjectiveConfig
from distillm.data import collate
from distillm.errors import UserError
from distillm.models import build_small_model
from distillm.objective import StudentObjective, supervised_logits, teacher_forward


@pytest.fixture
def batch(tiny_tokenizer):
    encode = lambda text: tiny_tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    eos = tiny_tokenizer.eos_token_id
    return collate(
        [(encode("sort one two"), encode(" one two") + [eos]), (encode("count"), encode(" 3") + [eos])],
        tiny_tokenizer.pad_token_id,
    )


@pytest.fixture
def model(tiny_tokenizer):
    return build_small_model(
        "gpt2",
        len(tiny_tokenizer),
        layers=1,
        hidden=16,
        heads=2,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
        attn_pdrop=0.0,
    ).eval()


def test_supervised_logits_equal_the_full_forward_at_the_supervised_positions(model, batch, monkeypatch):
    mask = batch["labels"] != IGNORE_INDEX
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask]
    torch.testing.assert_close(supervised_logits(model, batch, full.shape[-1]), full)
    monkeypatch.setattr("distillm.objective.has_plain_head", lambda m: False)  # the generic fallback
    torch.testing.assert_close(supervised_logits(model, batch, full.shape[-1]), full)


def test_the_language_model_term_adds_lm_coef_times_the_corpus_cross_entropy(model, batch):
    vocab = model.get_output_embeddings().weight.shape[0]
    objective = StudentObjective(model, ObjectiveConfig(lm_coef=0.5), vocab)
    corpus = {k: batch[k] for k in ("input_ids", "attention_mask")}
    corpus["labels"] = torch.where(
        batch["attention_mask"].bool(), batch["input_ids"].roll(-1, 1), IGNORE_INDEX
    )
    tokens = batch["labels"].ne(IGNORE_INDEX).sum()
    corpus_tokens = corpus["labels"].ne(IGNORE_INDEX).sum()
    loss = objective(batch, tokens, None, corpus, corpus_tokens)

    def reference_ce(b):  # plain PyTorch on the full logits: the independent reference
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE_INDEX)

    torch.testing.assert_close(loss.ce, reference_ce(batch))
    torch.testing.assert_close(loss.lm, reference_ce(corpus))
    torch.testing.assert_close(loss.total, reference_ce(batch) + 0.5 * reference_ce(corpus))


def test_chunked_and_dense_objectives_agree_with_a_teacher(model, batch, tiny_tokenizer):
    teacher = build_small_model("gpt2", len(tiny_tokenizer), layers=1, hidden=24, heads=2, seed=5).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    tokens = batch["labels"].ne(IGNORE_INDEX).sum()
    losses = {}
    for chunk in (0, 3):
        config = ObjectiveConfig(divergence="skew_reverse_kl", kd_ratio=0.6, chunk_size=chunk)
        teacher_out = teacher_forward(teacher, batch, vocab, chunked=chunk > 0)
        losses[chunk] = StudentObjective(model, config, vocab)(batch, tokens, teacher_out).total
    torch.testing.assert_close(losses[0], losses[3])


def test_the_chunked_path_refuses_a_model_whose_head_it_cannot_apply(model, batch, monkeypatch):
    monkeypatch.setattr("distillm.objective.has_plain_head", lambda m: False)
    objective = StudentObjective(model, ObjectiveConfig(chunk_size=4), model.config.vocab_size)
    with pytest.raises(UserError, match="objective.chunk_size=0"):
        objective(batch, torch.tensor(4))


@pytest.mark.parametrize(
    "lengths",
    [[7, 7, 7, 7], [3], [100, 10, 10, 10], [75, 40, 60, 50, 117, 55, 66, 70, 45, 52, 60, 61, 58, 49, 80, 66]],
)
def test_length_groups_cover_every_row_once_and_never_pad_more_than_the_whole_batch(lengths):
    from distillm.objective import length_groups

    groups = length_groups(lengths)
    assert sorted(r for group in groups for r in group) == list(range(len(lengths)))
    padded = sum(len(group) * max(lengths[r] for r in group) for group in groups)
    assert padded <= len(lengths) * max(lengths)
    if len(set(lengths)) == 1:
        assert len(groups) == 1  # nothing to save: one forward


def test_rows_of_very_different_lengths_are_split_and_one_long_row_runs_alone():
    from distillm.objective import length_groups

    assert length_groups([100, 10, 10, 10]) == [[1, 2, 3], [0]]  # 130 positions instead of 400


@pytest.fixture
def uneven_batch(tiny_tokenizer):
    """Two short rows and a long one: the supervised states are computed in two sub-batches."""
    encode = lambda text: tiny_tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    eos = tiny_tokenizer.eos_token_id
    long_prompt = encode(" ".join(["sort these words and count them"] * 6))
    return collate(
        [
            (encode("count"), encode(" 3") + [eos]),
            (long_prompt, encode(" done") + [eos]),
            (encode("a"), [eos]),
        ],
        tiny_tokenizer.pad_token_id,
    )


def test_supervised_states_of_an_uneven_batch_match_the_full_forward_in_value_and_gradient(
    model, uneven_batch
):
    from distillm.objective import length_groups, supervised_hidden_states

    lengths = uneven_batch["attention_mask"].sum(-1).tolist()
    assert len(length_groups(lengths)) > 1  # the split path is the one under test
    mask = uneven_batch["labels"] != IGNORE_INDEX
    model.zero_grad()
    full = model.transformer(
        input_ids=uneven_batch["input_ids"], attention_mask=uneven_batch["attention_mask"]
    ).last_hidden_state[mask]  # the reference: one forward over the padded batch
    weights = torch.randn_like(full)
    (full * weights).sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    grouped = supervised_hidden_states(model, uneven_batch)
    (grouped * weights).sum().backward()
    torch.testing.assert_close(grouped, full)
    for grad, expected in zip((p.grad for p in model.parameters()), expected_grads):
        torch.testing.assert_close(grad, expected)


def test_a_left_padded_batch_is_not_cut_and_still_gives_the_full_forward_states(model, uneven_batch):
    from distillm.objective import supervised_hidden_states

    flipped = {k: uneven_batch[k].flip(-1) for k in ("input_ids", "attention_mask", "labels")}  # left padding
    mask = flipped["labels"] != IGNORE_INDEX
    full = model.transformer(
        input_ids=flipped["input_ids"], attention_mask=flipped["attention_mask"]
    ).last_hidden_state[mask]
    torch.testing.assert_close(supervised_hidden_states(model, flipped), full)


def test_without_length_grouping_an_uneven_batch_runs_as_exactly_one_forward(model, uneven_batch):
    # Sharded students (ZeRO-3, FSDP) gather parameters per forward: every process must run the same number.
    from distillm.objective import supervised_hidden_states

    calls = []  # embedding lookups: one per forward, the model's own or distillm.fast_forward's
    hook = model.transformer.wte.register_forward_hook(lambda *args: calls.append(1))
    try:
        grouped = supervised_hidden_states(model, uneven_batch)
        assert len(calls) > 1  # the default splits this batch
        calls.clear()
        single = supervised_hidden_states(model, uneven_batch, sharded=True)
        assert len(calls) == 1
        calls.clear()
        config = ObjectiveConfig(divergence=None, kd_ratio=0.0)
        StudentObjective(model, config, model.config.vocab_size, sharded=True)(
            uneven_batch, torch.tensor(3.0)
        )
        assert len(calls) == 1
    finally:
        hook.remove()
    torch.testing.assert_close(single, grouped)
