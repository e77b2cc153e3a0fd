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
