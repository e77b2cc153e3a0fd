"""Loading teacher and student models (Hugging Face causal LMs), and building small ones from config."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from distillm.errors import UserError
from distillm.kernels.gelu import fuse_tanh_gelu
from distillm.storage import MANIFEST, recover_replaced, require_intact

logger = logging.getLogger(__name__)

# Small architectures for the bundled demo and the tests: family -> config class name and field names.
_FAMILY_FIELDS: dict[str, dict[str, str]] = {
    "gpt2": {"layers": "n_layer", "hidden": "n_embd", "heads": "n_head", "positions": "n_positions"},
    "llama": {
        "layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "positions": "max_position_embeddings",
    },
    "qwen2": {
        "layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "positions": "max_position_embeddings",
    },
    "mistral": {
        "layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "positions": "max_position_embeddings",
    },
    "opt": {
        "layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "positions": "max_position_embeddings",
    },
}


def small_model_config(
    family: str,
    vocab_size: int,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    positions: int = 1024,
    eos_token_id: int = 0,
    **extra: Any,
):
    """A ``transformers`` config of a small model of ``family`` (gpt2, llama, qwen2, mistral, opt)."""
    if family not in _FAMILY_FIELDS:
        raise ValueError(f"unknown model family {family!r}; choose from {sorted(_FAMILY_FIELDS)}")
    names = _FAMILY_FIELDS[family]
    kwargs: dict[str, Any] = {
        names["layers"]: layers,
        names["hidden"]: hidden,
        names["heads"]: heads,
        names["positions"]: positions,
        "vocab_size": vocab_size,
        "eos_token_id": eos_token_id,
        "bos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
    }
    if family in ("llama", "qwen2", "mistral"):
        kwargs.update(intermediate_size=hidden * 4, num_key_value_heads=heads, tie_word_embeddings=True)
    if family == "opt":
        kwargs.update(ffn_dim=hidden * 4, word_embed_proj_dim=hidden)
    if family == "gpt2":
        kwargs.update(n_inner=hidden * 4)
    kwargs.update(extra)
    return AutoConfig.for_model(family, **kwargs)


def build_small_model(family: str, vocab_size: int, seed: int = 0, **kwargs: Any):
    """A randomly initialised small causal LM (deterministic for ``seed``)."""
    config = small_model_config(family, vocab_size, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


# Model types whose causal-LM logits are exactly ``lm_head(base_model(...).last_hidden_state)``: no logit
# scaling or soft-capping after the head. For them the loss may apply the head itself, to the supervised
# positions only (and chunk by chunk); other models go through their full forward.
PLAIN_HEAD_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "opt"})


def unwrap_peft(model):
    """The Hugging Face model inside a peft wrapper (adapters stay injected), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def has_plain_head(model) -> bool:
    """Whether ``model`` (peft-wrapped or not) computes its logits as a plain linear head on its last hidden state."""
    inner = unwrap_peft(model)
    head = inner.get_output_embeddings()
    return getattr(inner.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES and type(head) is nn.Linear


# --------------------------------------------------------------------------------------------------------
# Loading.

_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(precision: str):
    return getattr(torch, _TORCH_DTYPES[precision])


def _check_exists(path: str, role: str, verify: bool = False) -> None:
    """A missing local path is a user error; anything shaped like ``org/name`` may be a hub id.

    ``verify``: check a local folder against its manifest (``verify_model_folder``)."""
    if not path:
        raise UserError(f"no {role} given; set model.{role}=PATH")
    local = Path(path).expanduser()
    recover_replaced(local)  # a folder whose replacement (best/, last/) was cut short by a kill
    if local.exists():
        if verify:
            verify_model_folder(local, role)
        return
    if path.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
        raise UserError(f"{role} path {path!r} does not exist; pass a model folder or a hub name")


def verify_model_folder(folder, role: str = "model") -> None:
    """Check a model folder distillm wrote (``best/``, ``last/``, a checkpoint) against its manifest before
    it is trusted; folders from elsewhere (no manifest, no distillm.json) are loaded as they are."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if (folder / MANIFEST).is_file() or (folder / "distillm.json").is_file():
        require_intact(
            folder,
            f"{role} folder",
            "Restore it from a copy; a training run's checkpoints/ hold resumable copies of its weights",
        )


def load_tokenizer(path: str, trust_remote_code: bool = False, role: str = "tokenizer"):
    """The tokenizer at ``path`` (of the ``role`` model); the pad token falls back to EOS (as GPT-2's)."""
    _check_exists(path, role)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a tokenizer from {path!r}: {error}") from error
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {path!r} has no EOS token; responses must end in one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _is_adapter(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_causal_lm(path: str, dtype: str = "fp32", trust_remote_code: bool = False, role: str = "model"):
    """A causal LM from a folder or hub name; a peft adapter folder is loaded onto its base and merged."""
    _check_exists(path, role, verify=True)
    try:
        if _is_adapter(path):
            from peft import AutoPeftModelForCausalLM  # peft is optional (the lora extra)

            model = AutoPeftModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
            ).merge_and_unload()
            model.requires_grad_(True)  # peft froze the base; merged, it is a plain (trainable) model again
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the {role} from {path!r}: {error}") from error
    fuse_tanh_gelu(model)
    warn_slow_bf16_conv1d(model, dtype, role)
    return model


def warn_slow_bf16_conv1d(model, dtype: str, role: str) -> bool:
    """Warn when a bf16 model built on transformers' ``Conv1D`` (GPT-2's family) will run on a CPU.

    On a CPU without native bf16 kernels, bf16 ``addmm`` with Conv1D's [in, out] weights takes a path far
    slower than fp32, where bf16 ``nn.Linear`` models (Llama, Qwen, OPT) ran faster in bf16 than in fp32
    (benchmarks/README.md, "Figures without a benchmark"). Returns whether it warned.
    """
    if dtype != "bf16" or torch.cuda.is_available():
        return False
    if not any(isinstance(module, Conv1D) for module in model.modules()):
        return False
    logger.warning(
        "the %s is bf16 and uses Conv1D layers (GPT-2 family): on a CPU its matrix products take a slow bf16 path "
        "(~50x slower than fp32 measured with torch 2.13); use fp32 for it on a CPU (model.teacher_dtype=fp32)",
        role,
    )
    return True


def is_adapter(path: str) -> bool:
    """Whether ``path`` is a peft adapter folder (adapter_config.json) rather than a full model."""
    return _is_adapter(path)


def load_lora_student(path: str, trust_remote_code: bool = False):
    """A LoRA student saved as an adapter folder: its base model plus the adapter, with the adapter trainable.

    This continues training an initialised LoRA student (the paper's init -> distill flow) instead of merging
    the adapter away; the folder's own adapter settings (rank, alpha, targets) apply, not ``model.lora.*``.
    """
    from peft import AutoPeftModelForCausalLM  # peft is optional (the lora extra)

    _check_exists(path, "student", verify=True)
    try:
        model = AutoPeftModelForCausalLM.from_pretrained(
            path, is_trainable=True, dtype=torch_dtype("fp32"), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the LoRA student from {path!r}: {error}") from error
    fuse_tanh_gelu(model)
    logger.info("student %s: training its LoRA adapter on top of its base model", path)
    return model


def merge_lora(model):
    """A plain Hugging Face model: a copy of the peft ``model`` with its adapters merged into the weights."""
    return copy.deepcopy(model).merge_and_unload()


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward. Non-reentrant checkpointing lets gradients reach LoRA adapters even
    though the frozen embeddings' output does not require grad."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def merge_adapter(model, adapter_path: str):
    """``model`` with the peft LoRA adapter at ``adapter_path`` merged into its weights."""
    from peft import PeftModel  # peft is optional (the lora extra)

    return PeftModel.from_pretrained(model, adapter_path).merge_and_unload()


def apply_lora(model, lora_config):
    """Wrap ``model`` with trainable LoRA adapters (distillm.config.LoraConfig)."""
    try:  # peft is optional (the lora extra)
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError as error:
        raise UserError("model.lora.enabled=true needs peft: pip install 'distillm[lora]'") from error
    peft_config = PeftLoraConfig(
        r=lora_config.r,
        lora_alpha=lora_config.alpha,
        lora_dropout=lora_config.dropout,
        target_modules=list(lora_config.target_modules) if lora_config.target_modules else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, student_name: str, teacher_name: str) -> None:
    """Refuse a teacher/student pair whose tokenizers differ: their distributions are over different tokens."""
    student_vocab = student_tokenizer.get_vocab()
    teacher_vocab = teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        only_student = len(set(student_vocab.items()) - set(teacher_vocab.items()))
        only_teacher = len(set(teacher_vocab.items()) - set(student_vocab.items()))
        raise UserError(
            f"the teacher's tokenizer ({teacher_name}, {len(teacher_vocab)} tokens) differs from the student's "
            f"({student_name}, {len(student_vocab)} tokens): {only_student} student and {only_teacher} teacher "
            "token ids do not match. Token-level distillation needs one shared tokenizer; pick a teacher and "
            "student of the same family, or use SeqKD (sequence-level), which only needs the teacher's text"
        )
    if student_tokenizer.eos_token_id != teacher_tokenizer.eos_token_id:
        raise UserError(
            f"teacher ({teacher_name}) and student ({student_name}) use different EOS ids "
            f"({teacher_tokenizer.eos_token_id} vs {student_tokenizer.eos_token_id})"
        )


def shared_vocab_size(student, teacher, tokenizer) -> int:
    """Vocabulary rows both models score: models of one tokenizer may pad their embeddings differently.

    Logits beyond ``len(tokenizer)`` belong to padding rows no text ever uses, so both distributions are
    compared over the first ``min(V_student, V_teacher)`` rows.
    """
    student_size = student.get_output_embeddings().weight.shape[0]
    teacher_size = teacher.get_output_embeddings().weight.shape[0]
    size = min(student_size, teacher_size)
    if size < len(tokenizer):
        raise UserError(
            f"a model scores only {size} tokens but the tokenizer has {len(tokenizer)}; the model and tokenizer "
            "do not belong together"
        )
    if student_size != teacher_size:
        logger.info(
            "student scores %d tokens and teacher %d (padded vocabularies of one tokenizer of %d): comparing "
            "the first %d",
            student_size,
            teacher_size,
            len(tokenizer),
            size,
        )
    return size
