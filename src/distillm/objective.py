"""The per-step objective: ``(1 - kd_ratio) CE + kd_ratio D(teacher, student) + lm_coef CE(pretraining chunk)``.

``StudentObjective`` wraps the student *and* its loss in one module, so that accelerate's DDP or DeepSpeed
wrapper sees a single forward per micro-batch (the pretraining term needs a second student pass, and DDP
allows only one forward per backward), and so that the memory-efficient path can apply the lm_head to
hidden states chunk by chunk instead of building full logits.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillm import IGNORE_INDEX
from distillm.config import ObjectiveConfig
from distillm.errors import UserError
from distillm.fast_forward import FastDecoder, fast_decoder
from distillm.losses import get_divergence
from distillm.losses.chunked import chunked_distillation_loss
from distillm.losses.reduction import distillation_loss
from distillm.models import PLAIN_HEAD_MODEL_TYPES, has_plain_head, unwrap_peft


class TeacherOutput(NamedTuple):
    """The frozen teacher's view of a batch: full logits (dense path) or hidden states + head (chunked)."""

    logits: Tensor | None = None  # [B, T, V]
    hidden: Tensor | None = None  # [N, H_teacher], supervised positions only
    head_weight: Tensor | None = None  # [V, H_teacher]
    head_bias: Tensor | None = None  # [V]


class StepLoss(NamedTuple):
    """A micro-batch's loss (with gradient) and its detached terms, each a mean over the step's tokens."""

    total: Tensor
    ce: Tensor
    divergence: Tensor
    lm: Tensor


def decoder_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final hidden states [B, T, H] of a causal LM, without applying its lm_head (no [B, T, V] logits)."""
    base = unwrap_peft(model).base_model  # GPT2Model, LlamaModel, OPTModel, ...: everything before lm_head
    return base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


# An extra sub-batch (one more forward call) is only worth it if it skips this share of the batch's padded
# token positions: a call has a fixed cost (Python module overhead on CPU, kernel launches on GPU).
_MIN_SAVING_PER_GROUP = 0.1
_MAX_GROUPS = 4


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Rows grouped by length (see ``_length_groups``); a fresh list, so callers may change it."""
    return [list(group) for group in _length_groups(tuple(lengths))]


@functools.lru_cache(maxsize=64)  # the teacher and the student ask about the same batch
def _length_groups(lengths: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Rows of a right-padded batch, grouped so that padding each group to its own longest row wastes least.

    Rows are sorted by length and cut into at most ``_MAX_GROUPS`` runs, minimising the padded positions
    computed (sum over groups of rows x longest row) plus ``_MIN_SAVING_PER_GROUP`` of the whole batch's
    positions per extra group. Returns the groups' row indices (ascending within a group); one group holding
    every row when splitting does not pay.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    ordered = [lengths[i] for i in order]
    penalty = _MIN_SAVING_PER_GROUP * len(lengths) * max(lengths)
    # best[k][j]: least cost of the j shortest rows in k groups; cut[k][j]: where its last group starts.
    inf = float("inf")
    best = [[inf] * (len(order) + 1) for _ in range(_MAX_GROUPS + 1)]
    cut = [[0] * (len(order) + 1) for _ in range(_MAX_GROUPS + 1)]
    best[0][0] = 0.0
    for k in range(1, _MAX_GROUPS + 1):
        for j in range(1, len(order) + 1):
            for i in range(j):  # the last group: sorted rows i .. j-1, padded to the longest, ordered[j-1]
                cost = best[k - 1][i] + (j - i) * ordered[j - 1] + (penalty if k > 1 else 0.0)
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    k = min(range(1, _MAX_GROUPS + 1), key=lambda g: best[g][len(order)])
    groups, end = [], len(order)
    while k > 0:
        start = cut[k][end]
        groups.append(tuple(sorted(order[start:end])))
        k, end = k - 1, start
    return tuple(groups[::-1])


def supervised_hidden_states(model: nn.Module, batch: dict[str, Tensor], sharded: bool = False) -> Tensor:
    """Final hidden states [N, H] at the N supervised positions of ``batch``, in row-major order.

    Two savings, both exact up to float rounding:

    - In a right-padded batch (the batch contract) a causal LM's real tokens never attend to the padding
      after them, so a row's states do not depend on how much padding follows it. Rows of very different
      lengths therefore run in sub-batches of similar length (``length_groups``), each cut to its own
      longest row: a third fewer positions on the bundled tasks' batches of 16. A batch whose labels reach
      into padding, or that is not right-padded, runs as one forward.
    - For the families of ``distillm.fast_forward`` the last layer runs at the supervised positions only.

    ``sharded=True`` (a model whose parameters are sharded over processes: ZeRO-3, FSDP) turns both off: such
    a model gathers its parameters in every call of its own forward, so every process must run the same
    number of forwards, through the model's forward.
    """
    mask = batch["labels"] != IGNORE_INDEX  # [B, T]
    attention = batch["attention_mask"]  # [B, T]
    lengths = attention.sum(-1)  # [B]
    right_padded = torch.arange(attention.shape[1], device=attention.device) < lengths[:, None]  # [B, T]
    contract = torch.equal(attention.bool(), right_padded) and torch.equal(mask & right_padded, mask)
    lengths_list = lengths.tolist()
    groups = length_groups(lengths_list) if contract and not sharded else []
    decoder = None if sharded else fast_decoder(model, positions=attention.shape[1])
    if len(groups) <= 1:
        return _kept_hidden_states(model, decoder, batch["input_ids"], attention, mask)
    destination = (mask.flatten().cumsum(0) - 1).view_as(mask)  # [B, T]: each position's row in the result
    parts, destinations = [], []
    for rows in groups:
        width = max(lengths_list[r] for r in rows)
        index = torch.tensor(rows, device=mask.device)
        group_mask = mask[index, :width]  # [b, width]
        parts.append(
            _kept_hidden_states(
                model, decoder, batch["input_ids"][index, :width], attention[index, :width], group_mask
            )
        )
        destinations.append(destination[index, :width][group_mask])
    return torch.cat(parts)[torch.cat(destinations).argsort()]  # [N, H], back in the batch's order


def _kept_hidden_states(
    model: nn.Module, decoder: FastDecoder | None, input_ids: Tensor, attention_mask: Tensor, keep: Tensor
) -> Tensor:
    """Final hidden states [N, H] where ``keep`` [B, T] is True: ``decoder``'s forward, or the model's own."""
    if decoder is None:
        return decoder_hidden_states(model, input_ids, attention_mask)[keep]
    return decoder.hidden_states(input_ids, attention_mask, keep)


def output_head(model: nn.Module, vocab_size: int) -> tuple[Tensor, Tensor | None]:
    """The lm_head's weight [V, H] (and bias) restricted to the first ``vocab_size`` rows."""
    head = unwrap_peft(model).get_output_embeddings()
    bias = head.bias[:vocab_size] if getattr(head, "bias", None) is not None else None
    return head.weight[:vocab_size], bias


def supervised_logits(
    model: nn.Module, batch: dict[str, Tensor], vocab_size: int, sharded: bool = False
) -> Tensor:
    """Logits [N, V] at the N supervised positions of ``batch`` only.

    Prompts and padding carry no loss, so for models with a plain head (``models.has_plain_head``) the head
    is applied to the supervised hidden states alone: typically a tenth of the [B, T, V] a full forward
    computes. Other models run their full forward and the rows are selected afterwards. ``sharded``: see
    ``supervised_hidden_states``.
    """
    if has_plain_head(model):
        hidden = supervised_hidden_states(model, batch, sharded)  # [N, H]
        weight, bias = output_head(model, vocab_size)
        return F.linear(hidden, weight, bias)  # [N, V]
    mask = batch["labels"] != IGNORE_INDEX  # [B, T]
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    return logits[..., :vocab_size][mask]  # [N, V]


@torch.no_grad()
def teacher_forward(
    teacher: nn.Module, batch: dict[str, Tensor], vocab_size: int, chunked: bool
) -> TeacherOutput:
    """Run the frozen teacher on the batch the student trains on (supervised positions only)."""
    if not chunked:
        return TeacherOutput(logits=supervised_logits(teacher, batch, vocab_size))
    _require_plain_head(teacher, "teacher")
    weight, bias = output_head(teacher, vocab_size)
    return TeacherOutput(hidden=supervised_hidden_states(teacher, batch), head_weight=weight, head_bias=bias)


def _require_plain_head(model: nn.Module, role: str) -> None:
    if not has_plain_head(model):
        model_type = getattr(unwrap_peft(model).config, "model_type", "?")
        raise UserError(
            f"objective.chunk_size > 0 applies the {role}'s lm_head itself, which is only exact for models whose "
            f"logits are a plain linear head ({', '.join(sorted(PLAIN_HEAD_MODEL_TYPES))}); this {role} is a "
            f"{model_type!r}. Set objective.chunk_size=0"
        )


class StudentObjective(nn.Module):
    """The student and the objective of one micro-batch; what accelerate prepares and the optimizer updates.

    ``sharded=True`` runs every micro-batch as one call of the student's own forward (required when its
    parameters are sharded over processes: see ``supervised_hidden_states``).
    """

    def __init__(
        self, student: nn.Module, objective: ObjectiveConfig, vocab_size: int, sharded: bool = False
    ):
        super().__init__()
        self.student = student
        self.objective = objective
        self.vocab_size = vocab_size
        self.sharded = sharded
        self.divergence = (
            get_divergence(objective.divergence, **objective.hyper_parameters())
            if objective.divergence is not None and objective.kd_ratio > 0
            else None
        )

    def forward(
        self,
        batch: dict[str, Tensor],
        num_tokens: Tensor,
        teacher: TeacherOutput | None = None,
        pretrain_batch: dict[str, Tensor] | None = None,
        pretrain_tokens: Tensor | None = None,
    ) -> StepLoss:
        parts = self._loss(batch, num_tokens, teacher if self.divergence is not None else None)
        total, lm = parts.total, torch.zeros_like(parts.ce)
        if pretrain_batch is not None and self.objective.lm_coef > 0:
            lm_loss = self._loss(pretrain_batch, pretrain_tokens, None).total  # plain CE on the corpus
            total = total + self.objective.lm_coef * lm_loss
            lm = lm_loss.detach()
        return StepLoss(total=total, ce=parts.ce, divergence=parts.divergence, lm=lm)

    def _loss(self, batch: dict[str, Tensor], num_tokens: Tensor | None, teacher: TeacherOutput | None):
        """``(1 - kd_ratio) CE + kd_ratio D`` on the supervised positions; plain CE when ``teacher`` is None."""
        mask = batch["labels"] != IGNORE_INDEX  # [B, T]
        labels = batch["labels"][mask]  # [N]
        divergence = self.divergence if teacher is not None else None
        kd_ratio = self.objective.kd_ratio if divergence is not None else 0.0
        if self.objective.chunk_size == 0:
            return distillation_loss(
                supervised_logits(self.student, batch, self.vocab_size, self.sharded),  # [N, V]
                labels,
                divergence,
                kd_ratio,
                num_tokens=num_tokens,
                teacher_logits=teacher.logits if teacher is not None else None,
            )
        _require_plain_head(self.student, "student")
        hidden = supervised_hidden_states(self.student, batch, self.sharded)  # [N, H]
        weight, bias = output_head(self.student, self.vocab_size)
        return chunked_distillation_loss(
            hidden,
            weight,
            labels,
            divergence,
            kd_ratio,
            num_tokens,
            teacher_hidden=teacher.hidden if teacher is not None else None,
            teacher_head_weight=teacher.head_weight if teacher is not None else None,
            teacher_head_bias=teacher.head_bias if teacher is not None else None,
            chunk_size=self.objective.chunk_size,
            lm_head_bias=bias,
        )
