"""distillm: distil large language models into small ones.

Skew KL and skew reverse KL (DistiLLM, Ko et al., ICML 2024), forward/reverse KL, generalized JSD and TVD,
adaptive off-policy training with a replay buffer, and the paper's token-level baselines (SFT, KD, SeqKD,
ImitKD, GKD), on Hugging Face causal LMs. MiniLLM, the policy-gradient baseline, is not implemented yet.
"""

__version__ = "0.1.0"

IGNORE_INDEX = -100
"""Label value of positions that carry no loss (prompt and padding), as in PyTorch's cross-entropy."""
