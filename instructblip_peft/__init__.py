"""LoRA fine-tuning of InstructBLIP's Q-Former and/or LLM (Kim et al., EMNLP Findings 2024)."""

__version__ = "0.1.0"
