"""Fast sampling from a causal LM with a KV cache, and turning the samples into training batches.

:func:`sample` is a lean decoding loop: it keeps the model's KV cache, computes the language-model head for
the last position only, and draws tokens by inverse-CDF sampling from one uniform number per row. On a CPU it
is faster than ``model.generate`` with the same settings (``benchmarks/generation.py``; benchmarks/README.md).
``generation.sampler`` picks the loop: ours, ``model.generate``, or ``auto`` (:func:`resolve_sampler`: the one
measured faster on the device type).
:func:`samples_to_batch` builds a batch of the project's batch contract (``docs/design.md``) from the prompts
and the sampled responses; see ``docs/generation.md`` for the label convention.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from distillm.config import GenerationConfig
from distillm.data import collate
from distillm.fast_forward import FastDecoder, fast_decoder
from distillm.models import has_plain_head

logger = logging.getLogger(__name__)

# Where the sampling randomness comes from: one generator for the batch (None: the global RNG), or one per row
# (MiniLLM's rollouts: each keyed by its prompt's place in the run, so batching and processes do not matter).
Generators = torch.Generator | list[torch.Generator] | None

# Heads of at least this many weights are applied as W @ h^T (see `_LastLogits`); below it F.linear is as fast.
_TRANSPOSED_HEAD_MIN_SIZE = 1 << 22
# Packing the weights for decoding (`FastDecoder.pack_weights`) costs a few unpacked steps and saves part of
# every later one: a run of fewer steps does not pay it back (benchmarks/README.md, packed_linear.py).
_MIN_STEPS_TO_PACK = 16
_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# What `generation.sampler=auto` runs on each device type. CPU: ours, faster than `generate`
# (benchmarks/README.md, generation.py; docs/generation.md). CUDA: not measured yet; ours until the first GPU
# run of benchmarks/gpu_check.sh (section "sampling") says otherwise: it prints which entry to write here. Device
# types not listed run ours as well.
AUTO_SAMPLER: dict[str, str] = {"cpu": "distillm", "cuda": "distillm"}


def resolve_sampler(sampler: str, device: torch.device | str) -> str:
    """The decoding loop ``sampler`` (``generation.sampler``) means on ``device``: "distillm" or "generate"."""
    if sampler == "auto":
        return AUTO_SAMPLER.get(torch.device(device).type, "distillm")
    if sampler not in ("distillm", "generate"):
        raise ValueError(f"unknown sampler {sampler!r}; choose auto, distillm or generate")
    return sampler


def sample(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_attention_mask: Tensor,
    config: GenerationConfig,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample a response for each prompt; returns the response tokens, ``[B, N]`` long with ``N <= max_new_tokens``.

    ``prompt_ids`` ``[B, P]`` is **left**-padded and ``prompt_attention_mask`` ``[B, P]`` marks its real
    tokens. Each row stops at its own ``eos_token_id`` (kept in the row); the positions after it hold
    ``pad_token_id``. Decoding stops as soon as every row has finished. All randomness comes from
    ``generator`` (on the model's device, or on the CPU), so a generator seeded the same way gives the same
    samples. The model runs in eval mode without gradients and is put back in its previous mode afterwards.
    Works on Hugging Face causal LMs, on peft-wrapped ones and on DDP/DeepSpeed-style ``.module`` wrappers.
    ``config.sampler`` picks our decoding loop or ``model.generate`` (same contract; :func:`resolve_sampler`).
    """
    decode = _decode if resolve_sampler(config.sampler, prompt_ids.device) == "distillm" else _hf_generate
    was_training = model.training
    model.eval()  # no dropout while sampling, as in the original
    try:
        with torch.inference_mode():
            response = decode(
                model, prompt_ids, prompt_attention_mask, config, eos_token_id, pad_token_id, generator
            )
    finally:
        model.train(was_training)
    # A plain tensor (not an inference tensor), so the training step may save it for backward.
    return response.clone()


def _decode(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_attention_mask: Tensor,
    config: GenerationConfig,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None,
) -> Tensor:
    """The decoding loop of :func:`sample` (already under inference mode). Returns ``[B, N]``."""
    batch_size = prompt_ids.shape[0]
    max_new = config.max_new_tokens
    run = _DecodingRun(model, prompt_ids, prompt_attention_mask, max_new, config.pack_weights)
    banned = (
        _NgramBan(config.no_repeat_ngram_size, prompt_ids, run.prompt_mask)
        if config.no_repeat_ngram_size
        else None
    )
    response = prompt_ids.new_full((batch_size, max_new), pad_token_id)  # [B, N]
    finished = torch.zeros(batch_size, dtype=torch.bool, device=prompt_ids.device)

    logits = run.prefill()
    steps = 0
    for step in range(max_new):
        if banned is not None:
            banned.apply(logits)
        token = _next_token(logits, config, generator)  # [B]
        token = torch.where(finished, pad_token_id, token)
        response[:, step] = token
        steps = step + 1
        finished |= token == eos_token_id
        if banned is not None:
            banned.append(token)
        # One device sync per step, like `generate`'s stopping check; cheap next to a forward pass.
        if step == max_new - 1 or bool(finished.all()):
            break
        logits = run.step(token)
    return response[:, :steps]


class _DecodingRun:
    """One model's side of a decoding loop over left-padded prompts: its KV cache, mask and positions.

    :meth:`prefill` runs the prompts and returns the logits ``[B, V]`` (float32) that predict the first new
    token; each :meth:`step` feeds one token per row and returns the logits for the next. Positions follow
    the attention mask (the first real token of a row is at position 0, Hugging Face's convention for
    left padding), for every family: RoPE models would otherwise see the padding as positions.
    """

    def __init__(
        self, model: nn.Module, prompt_ids: Tensor, prompt_attention_mask: Tensor, max_new: int, pack: bool
    ):
        batch_size, self.prompt_len = prompt_ids.shape
        self.prompt_ids = prompt_ids
        self.last_logits = _LastLogits.for_model(model, capacity=self.prompt_len + max_new)
        self.prompt_mask = prompt_attention_mask.to(device=prompt_ids.device, dtype=torch.long)  # [B, P]
        self.pack = pack and max_new >= _MIN_STEPS_TO_PACK
        # Without padding the attention mask can be left out, which lets SDPA use its causal fast path.
        self.has_padding = not bool(self.prompt_mask.all())
        self.full_mask: Tensor | None = (
            torch.cat([self.prompt_mask, self.prompt_mask.new_ones(batch_size, max_new)], dim=1)
            if self.has_padding
            else None
        )  # [B, P + N]
        # Left padding: the first real token sits at position 0 (HF's convention), padding gets a harmless 0.
        self.positions = (self.prompt_mask.cumsum(-1) - 1).clamp_min(0)  # [B, P]
        self.next_position = self.positions[:, -1:] + 1  # [B, 1]
        self.cache: Any = None
        self.steps = 0

    def prefill(self) -> Tensor:
        """Run the prompts; returns the logits ``[B, V]`` at each row's last prompt position."""
        prompt_mask = self.full_mask[:, : self.prompt_len] if self.full_mask is not None else None
        logits, self.cache = self.last_logits(self.prompt_ids, prompt_mask, self.positions, None)
        fast = self.last_logits.fast
        if self.pack and fast is not None:
            # After the prefill: its wide products gain nothing from the packed layout.
            fast.pack_weights(self.prompt_ids.shape[0], head=self.last_logits.head)
        if self.full_mask is not None and self.last_logits.sdpa_bool_masks:
            # Decoding steps get the [B, 1, 1, KV] boolean mask SDPA uses (True = attend), sliced from one
            # tensor: transformers passes a 4D mask through, so it skips building the mask at every step.
            self.full_mask = self.full_mask.bool()[:, None, None, :]
        return logits

    def step(self, token: Tensor) -> Tensor:
        """Feed ``token`` ``[B]``; returns the logits ``[B, V]`` that predict the token after it."""
        self.steps += 1
        mask = self.full_mask[..., : self.prompt_len + self.steps] if self.full_mask is not None else None
        logits, self.cache = self.last_logits(token[:, None], mask, self.next_position, self.cache)
        self.next_position = self.next_position + 1
        return logits


@dataclass(frozen=True)
class MixedSamples:
    """Responses drawn token by token from ``(1 - alpha) q + alpha p``, with both models' log-probabilities.

    ``tokens`` ``[B, N]`` long: each row up to and including its first EOS, ``pad_token_id`` after it.
    ``mask`` ``[B, N]`` bool: the real tokens (the first EOS included). ``student_logprobs`` and
    ``teacher_logprobs`` ``[B, N]`` float32: ``log q(y_t | x, y_<t)`` and ``log p(y_t | x, y_<t)`` of the
    models' own distributions (temperature 1, no top-k/top-p), 0 where ``mask`` is False: what MiniLLM's
    importance weights and rewards need (``distillm.losses.minillm``).
    """

    tokens: Tensor
    mask: Tensor
    student_logprobs: Tensor
    teacher_logprobs: Tensor


def sample_mixed(
    student: nn.Module,
    teacher: nn.Module,
    prompt_ids: Tensor,
    prompt_attention_mask: Tensor,
    config: GenerationConfig,
    teacher_mix_alpha: float,
    eos_token_id: int,
    pad_token_id: int,
    generator: Generators = None,
) -> MixedSamples:
    """Sample responses from the mixture ``(1 - alpha) q + alpha p`` of student ``q`` and teacher ``p``.

    MiniLLM's teacher-mixed sampling (Gu et al., ICLR 2024; shared/reference/minillm-method.md, section 3):
    both models decode the same token history, each with its own KV cache, and at every step the processed
    distributions (``config``'s temperature, top-k and top-p applied to each model's logits, as the original
    applies the same logits processors to both) are mixed in probability space and one token is drawn.
    Prompts, EOS handling, positions and randomness as in :func:`sample` (our decoding loop; the
    ``config.sampler`` choice does not apply, ``generate`` cannot mix two models). With ``alpha = 0`` it
    draws exactly the tokens :func:`sample` draws from the student for the same generator state, with
    ``alpha = 1`` those it draws from the teacher (without top-p; the nucleus is formed in another token
    order there, same distribution). Models with different logits widths (a padded vocabulary) are cut to
    the narrower one. Both models run in eval mode without gradients and get their modes back afterwards.
    ``generator`` may be a list of one generator per row: row ``i`` then draws only from ``generator[i]``, so
    its response is the same whichever rows share its batch (up to the rounding of its logits).
    """
    if not 0.0 <= teacher_mix_alpha <= 1.0:
        raise ValueError(f"teacher_mix_alpha must be in [0, 1], got {teacher_mix_alpha!r}")
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        with torch.inference_mode():
            samples = _decode_mixed(
                student,
                teacher,
                prompt_ids,
                prompt_attention_mask,
                config,
                teacher_mix_alpha,
                eos_token_id,
                pad_token_id,
                generator,
            )
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    # Plain tensors (not inference tensors), so a training step may save them for backward.
    return MixedSamples(**{name: value.clone() for name, value in vars(samples).items()})


def _decode_mixed(
    student: nn.Module,
    teacher: nn.Module,
    prompt_ids: Tensor,
    prompt_attention_mask: Tensor,
    config: GenerationConfig,
    alpha: float,
    eos_token_id: int,
    pad_token_id: int,
    generator: Generators,
) -> MixedSamples:
    """The decoding loop of :func:`sample_mixed` (already under inference mode)."""
    batch_size = prompt_ids.shape[0]
    max_new = config.max_new_tokens
    runs = [
        _DecodingRun(model, prompt_ids, prompt_attention_mask, max_new, config.pack_weights)
        for model in (student, teacher)
    ]
    banned = (
        _NgramBan(config.no_repeat_ngram_size, prompt_ids, runs[0].prompt_mask)
        if config.no_repeat_ngram_size
        else None
    )
    tokens = prompt_ids.new_full((batch_size, max_new), pad_token_id)  # [B, N]
    mask = torch.zeros(batch_size, max_new, dtype=torch.bool, device=prompt_ids.device)  # [B, N]
    logprobs = torch.zeros(2, batch_size, max_new, device=prompt_ids.device)  # [student/teacher, B, N]
    finished = torch.zeros(batch_size, dtype=torch.bool, device=prompt_ids.device)

    student_logits, teacher_logits = (run.prefill() for run in runs)
    width = min(student_logits.shape[-1], teacher_logits.shape[-1])
    steps = 0
    for step in range(max_new):
        student_logits, teacher_logits = student_logits[:, :width], teacher_logits[:, :width]  # [B, V]
        # The models' own log-probabilities, before any processing changes the logits.
        own_logprobs = torch.stack([student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)])
        if banned is not None:
            banned.apply(student_logits)
            banned.apply(teacher_logits)
        token = _next_mixed_token(student_logits, teacher_logits, alpha, config, generator)  # [B]
        live = ~finished
        token = torch.where(finished, pad_token_id, token)
        tokens[:, step] = token
        mask[:, step] = live
        chosen = own_logprobs.gather(-1, token[None, :, None].expand(2, -1, 1)).squeeze(-1)  # [2, B]
        logprobs[:, :, step] = torch.where(live, chosen, 0.0)
        steps = step + 1
        finished |= token == eos_token_id
        if banned is not None:
            banned.append(token)
        if step == max_new - 1 or bool(finished.all()):
            break
        student_logits, teacher_logits = (run.step(token) for run in runs)
    return MixedSamples(tokens[:, :steps], mask[:, :steps], logprobs[0, :, :steps], logprobs[1, :, :steps])


def _next_mixed_token(
    student_logits: Tensor,
    teacher_logits: Tensor,
    alpha: float,
    config: GenerationConfig,
    generator: Generators,
) -> Tensor:
    """One token per row from ``(1 - alpha) q + alpha p`` of the processed distributions. ``[B, V]`` x2 -> ``[B]``."""
    mixture = (1.0 - alpha) * _processed_probs(student_logits, config) + alpha * _processed_probs(
        teacher_logits, config
    )  # [B, V]; with alpha 0 (or 1) exactly the student's (teacher's) probabilities
    if not config.do_sample:
        return mixture.argmax(-1)
    return _sample_categorical(mixture, generator)


def _processed_probs(logits: Tensor, config: GenerationConfig) -> Tensor:
    """The sampling distribution ``[B, V]`` of ``logits`` ``[B, V]`` under ``config``'s temperature, top-k, top-p.

    The same processing as :func:`_next_token`, with the nucleus kept in vocabulary order (so that two
    models' distributions can be added).
    """
    if not config.do_sample:
        return logits.softmax(-1)
    if config.temperature != 1.0:
        logits = logits / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth_largest = logits.topk(config.top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = logits.softmax(-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, V]
        outside = (sorted_probs.cumsum(-1) - sorted_probs) >= config.top_p  # the first one always stays
        probs = probs.masked_fill(outside.scatter(-1, order, outside), 0.0)
    return probs


def _hf_generate(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_attention_mask: Tensor,
    config: GenerationConfig,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None,
) -> Tensor:
    """:func:`sample` through Hugging Face's ``model.generate`` (already under inference mode). Returns ``[B, N]``.

    ``generate`` draws from the global RNG, so its seed is drawn from ``generator`` and the global RNG of the
    CPU and of the prompts' device is put back afterwards: the same generator state gives the same samples,
    and nothing else's random stream moves. ``generate`` keeps each row's EOS, pads after it with
    ``pad_token_id`` and stops when every row has finished, as our loop does.
    """
    hf_model = _unwrap(model)
    device = prompt_ids.device
    seed_device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=seed_device))
    if config.do_sample:
        settings = dict(
            do_sample=True, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p
        )
    else:
        settings = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        output = hf_model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_attention_mask.to(device),
            max_new_tokens=config.max_new_tokens,
            no_repeat_ngram_size=config.no_repeat_ngram_size or None,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            use_cache=True,
            **settings,
        )
    return output[:, prompt_ids.shape[1] :]  # [B, N]


def _next_token(logits: Tensor, config: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    """Pick the next token of each row from its logits ``[B, V]`` (modified in place). Returns ``[B]`` long."""
    if not config.do_sample:
        return logits.argmax(-1)
    if config.temperature != 1.0:
        logits.div_(config.temperature)
    if config.top_k and config.top_k < logits.shape[-1]:
        kth_largest = logits.topk(config.top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits.masked_fill_(logits < kth_largest, float("-inf"))
    if config.top_p < 1.0:
        # Nucleus: keep the most likely tokens until their mass reaches top_p (the first one always).
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        sorted_probs = sorted_logits.softmax(-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs.masked_fill_(mass_before >= config.top_p, 0.0)
        choice = _sample_categorical(sorted_probs, generator)
        return order.gather(-1, choice[:, None]).squeeze(-1)
    return _sample_categorical(logits.softmax(-1), generator)


def _sample_categorical(probs: Tensor, generator: Generators, block: int = 256) -> Tensor:
    """One draw per row from unnormalised probabilities ``[B, V]`` by inverse CDF. Returns ``[B]`` long.

    One uniform number per row instead of ``torch.multinomial``'s work over the whole vocabulary. The CDF is
    walked in two levels (blocks of ``block`` tokens, then tokens inside the chosen block), in float64 so
    the bins stay exact; two levels because a float64 cumsum over the whole vocabulary is slow on a large
    vocabulary (benchmarks/README.md, "Figures without a benchmark").
    """
    batch, vocab = probs.shape
    padding = (-vocab) % block
    blocks = (F.pad(probs, (0, padding)) if padding else probs).view(batch, -1, block)  # [B, nb, block]
    block_cdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # [B, nb]
    u = _uniforms(batch, generator, probs.device)  # [B, 1]
    u = u * block_cdf[:, -1:]  # [B, 1], in [0, total)
    # right=True: the first bin whose CDF exceeds u, so a zero-probability bin is never chosen.
    chosen = torch.searchsorted(block_cdf, u, right=True).clamp_max_(block_cdf.shape[1] - 1)  # [B, 1]
    mass_before = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp_min(0)), 0.0)  # [B, 1]
    inner = blocks.gather(1, chosen[:, :, None].expand(batch, 1, block)).squeeze(1)  # [B, block]
    inner_cdf = inner.cumsum(-1, dtype=torch.float64)  # [B, block]
    # Stay inside the block's own total, which rounding may put a hair below the block CDF's difference.
    offset = torch.minimum(u - mass_before, inner_cdf[:, -1:] * (1 - 1e-12))
    within = torch.searchsorted(inner_cdf, offset, right=True).clamp_max_(block - 1)  # [B, 1]
    return (chosen * block + within).squeeze(-1).clamp_max_(vocab - 1)


def _uniforms(batch: int, generator: Generators, device: torch.device) -> Tensor:
    """One float64 uniform number per row, ``[B, 1]``: from one generator for the whole batch, or from row
    ``i``'s own generator (``generator[i]``), so that a row's draws do not depend on the other rows."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"{len(generator)} row generators for a batch of {batch} rows")
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=g.device) for g in generator])
        return u.to(device)[:, None]
    rand_device = generator.device if generator is not None else device
    return torch.rand(batch, 1, generator=generator, dtype=torch.float64, device=rand_device).to(device)


class _NgramBan:
    """Forbids tokens that would repeat an n-gram of the row's sequence (real prompt tokens + response)."""

    def __init__(self, size: int, prompt_ids: Tensor, prompt_mask: Tensor):
        self.size = size
        self.sequences: list[list[int]] = [
            row[mask.bool()].tolist() for row, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())
        ]
        # Per row: the (size - 1) tokens before an n-gram's last token -> the last tokens seen after them.
        self.seen: list[dict[tuple[int, ...], set[int]]] = [{} for _ in self.sequences]
        for sequence, seen in zip(self.sequences, self.seen):
            for end in range(size, len(sequence) + 1):
                self._record(sequence, seen, end)

    def _record(self, sequence: list[int], seen: dict[tuple[int, ...], set[int]], end: int) -> None:
        seen.setdefault(tuple(sequence[end - self.size : end - 1]), set()).add(sequence[end - 1])

    def apply(self, logits: Tensor) -> None:
        """Set the logits ``[B, V]`` of forbidden tokens to -inf, in place."""
        for row, (sequence, seen) in enumerate(zip(self.sequences, self.seen)):
            if len(sequence) + 1 < self.size:
                continue
            prefix = tuple(sequence[len(sequence) - self.size + 1 :]) if self.size > 1 else ()
            forbidden = seen.get(prefix)
            if forbidden:
                logits[row, list(forbidden)] = float("-inf")

    def append(self, token: Tensor) -> None:
        """Extend each row by its new token ``[B]`` and record the n-gram it completes."""
        for sequence, seen, value in zip(self.sequences, self.seen, token.tolist()):
            sequence.append(value)
            if len(sequence) >= self.size:
                self._record(sequence, seen, len(sequence))


@dataclass
class _LastLogits:
    """One forward step that returns the last position's logits ``[B, V]`` (float32) and the KV cache.

    For models with a plain linear head (``distillm.models.has_plain_head``), the backbone is
    called directly and the head is applied to the last hidden state as ``W @ h^T``: for a skinny ``[B, H]``
    input and a large head (vocab 49k x 576), MKL runs that product faster than ``h @ W^T`` (``F.linear``),
    and the head is a large share of a decoding step on CPU (benchmarks/README.md, generation.py). Small
    heads keep ``F.linear``. For the families of ``distillm.fast_forward`` the backbone is our own forward
    over the model's modules, with a KV cache preallocated for ``capacity`` positions (no Hugging Face cache
    objects or mask builders per step). Other models run their full forward, with ``logits_to_keep=1`` when
    they accept it.
    """

    module: nn.Module
    head: nn.Linear | None
    cache_arg: str
    accepts_positions: bool
    keep_last_only: dict[str, Any]
    sdpa_bool_masks: bool
    fast: FastDecoder | None = None
    capacity: int = 0

    @classmethod
    def for_model(cls, model: nn.Module, capacity: int) -> _LastLogits:
        """The step function for ``model``; ``capacity``: prompt width + new tokens, the longest a row gets."""
        hf_model = _unwrap(model)
        head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
        config = getattr(hf_model, "config", None)
        plain_head = head is not None and has_plain_head(hf_model)
        fast = fast_decoder(hf_model, positions=capacity) if plain_head else None
        if fast is not None:  # our own decoding forward (distillm.fast_forward) and its preallocated cache
            return cls(hf_model, head, "", False, {}, True, fast=fast, capacity=capacity)
        if plain_head:
            module, keep_last_only = hf_model.base_model, {}
        else:
            module, head = hf_model, None
            parameters = inspect.signature(hf_model.forward).parameters
            keep_last_only = {
                name: 1 for name in ("logits_to_keep", "num_logits_to_keep") if name in parameters
            }
            keep_last_only = dict(list(keep_last_only.items())[:1])
        parameters = inspect.signature(module.forward).parameters
        # transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated).
        cache_arg = "cache" if "cache" in parameters else "past_key_values"
        # transformers 5 gives SDPA boolean masks and passes 4D masks through unchanged (4.x used float masks).
        # Not with a sliding window: its cache keeps only the window's keys, which a full-width mask overruns.
        sdpa_bool_masks = (
            _TRANSFORMERS_MAJOR >= 5
            and getattr(config, "_attn_implementation", None) == "sdpa"
            and getattr(config, "sliding_window", None) is None
        )
        return cls(module, head, cache_arg, "position_ids" in parameters, keep_last_only, sdpa_bool_masks)

    def __call__(
        self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor, cache: Any
    ) -> tuple[Tensor, Any]:
        if self.fast is not None:
            if cache is None:
                prompt_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
                hidden, cache = self.fast.prefill(input_ids, prompt_mask, position_ids, self.capacity)
            else:
                hidden = self.fast.step(input_ids[:, 0], position_ids, cache)
            return self._head(hidden), cache
        kwargs: dict[str, Any] = {self.cache_arg: cache, "use_cache": True, **self.keep_last_only}
        if self.accepts_positions:
            kwargs["position_ids"] = position_ids
        outputs = self.module(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        new_cache = getattr(outputs, "cache", None)
        if new_cache is None:  # transformers 4.x
            new_cache = getattr(outputs, "past_key_values", None)
        if self.head is None:
            return outputs.logits[:, -1].float(), new_cache
        return self._head(outputs.last_hidden_state[:, -1]), new_cache

    def _head(self, hidden: Tensor) -> Tensor:
        """The head on the last hidden states ``[B, H]``: logits ``[B, V]`` in float32."""
        if self.fast is not None and self.fast.packed(self.head):
            return self.fast.linear(self.head, hidden).float()
        if self.head.weight.numel() < _TRANSPOSED_HEAD_MIN_SIZE:
            return self.head(hidden).float()
        logits = (self.head.weight @ hidden.T).T  # [B, V]; see the class docstring for the transposition
        if self.head.bias is not None:
            logits = logits + self.head.bias
        return logits.float()


def _unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP/DeepSpeed (``.module``) and peft (``get_base_model()``) wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    get_base_model = getattr(model, "get_base_model", None)
    # peft injects LoRA layers into the base model's modules, so calling the base model keeps the adapters.
    return get_base_model() if callable(get_base_model) else model


def samples_to_batch(
    prompt_ids: Tensor,
    prompt_attention_mask: Tensor,
    response_ids: Tensor,
    eos_token_id: int,
    pad_token_id: int,
) -> dict[str, Tensor]:
    """A training batch (the batch contract of ``docs/design.md``) of prompts and sampled responses.

    ``prompt_ids`` ``[B, P]`` left-padded with ``prompt_attention_mask``; ``response_ids`` ``[B, N]`` as
    returned by :func:`sample`. Each row's response is cut after its first EOS; a response that reached ``N``
    without EOS keeps all its tokens and gets no invented EOS. The rows are collated exactly like dataset
    rows (:func:`distillm.data.collate`): the model reads ``prompt + response`` without its final token and
    ``labels`` are shifted, so they supervise exactly the response: the last prompt position predicts the
    first response token, ..., the position before the EOS predicts the EOS. The response end is found by
    position (first EOS), never by comparing with the pad id, which equals EOS for GPT-2 tokenizers.
    """
    batch_size, response_len = response_ids.shape
    prompt_lengths = prompt_attention_mask.sum(-1).tolist()
    is_eos = response_ids == eos_token_id  # [B, N]
    has_eos = is_eos.any(-1)
    response_lengths = torch.where(has_eos, is_eos.int().argmax(-1) + 1, response_len).tolist()  # [B]
    items = [
        (
            prompt_ids[b, prompt_ids.shape[1] - prompt_lengths[b] :].tolist(),
            response_ids[b, : response_lengths[b]].tolist(),
        )
        for b in range(batch_size)
    ]
    batch = collate(items, pad_token_id)
    return {key: value.to(prompt_ids.device) for key, value in batch.items()}
