"""LoRA fine-tuning of InstructBLIP's Q-Former and/or LLM (Kim et al., EMNLP Findings 2024)."""
import logging

__version__ = "0.1.0"

# peft imports bitsandbytes where it is installed; on CPUs with AVX512-BF16 bitsandbytes then logs that an
# optional accelerated kernel package is missing (it falls back to its own kernels): noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
