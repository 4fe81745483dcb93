"""Mid-size random InstructBLIP models for benchmarks: real-shaped where the cost is, small enough for a CPU.

- ViT: 4 layers, width 768, 224 px, patch 14 (257 tokens, like ViT-g's sequence; 4 of its 39 layers).
- Q-Former: the real width and depth (768, 12 layers, cross-attention every 2nd layer, 32 queries).
- LLM: T5 with 6 + 6 layers at d_model 512, or a LLaMA of 8 layers at width 512.
(mid_preset's *_layers arguments change the depths: train_step.py uses a 4-layer Q-Former, a 12-layer LLaMA.)
Tokenizers are the tiny presets' (offline, a few hundred tokens), so the LM head is far smaller than a real
32k vocabulary: timings understate the head's share.
Shared by benchmarks/eval_ranking.py, eval_vision_cache.py, train_step.py and gpu_real_size.py.
"""
from __future__ import annotations

import platform
import random

import torch

from instructblip_peft.config import resolve_settings
from instructblip_peft.model import load_model, load_preset

VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 4, "num_attention_heads": 12}
QFORMER = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "cross_attention_frequency": 2}
TEXT = {
    "t5": {"d_model": 512, "d_ff": 1024, "d_kv": 64, "num_layers": 6, "num_decoder_layers": 6, "num_heads": 8,
           "initializer_factor": 0.05},
    "llama": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 8},
}


def mid_preset(family: str, image_size: int = 224, max_txt_len: int = 128, vision_layers: int | None = None,
               qformer_layers: int | None = None, llm_layers: int | None = None) -> dict:
    """A preset dict (the shape of presets.yaml's tiny ones) that model.load_model builds randomly.
    llm_layers: T5's encoder and decoder layers each, or LLaMA's layers."""
    if family not in TEXT:
        raise ValueError(f"family must be one of {list(TEXT)}, got {family!r}")
    text = dict(TEXT[family])
    if llm_layers:
        text.update({"num_layers": llm_layers, "num_decoder_layers": llm_layers} if family == "t5"
                    else {"num_hidden_layers": llm_layers})
    return {
        "name": f"mid-{family}",
        "llm": "flant5xl" if family == "t5" else "vicuna7b",
        "family": family,
        "tiny": {"image_size": image_size, "patch_size": 14,
                 "vision": dict(VISION, **({"num_hidden_layers": vision_layers} if vision_layers else {})),
                 "qformer": dict(QFORMER, **({"num_hidden_layers": qformer_layers} if qformer_layers else {})),
                 "num_query_tokens": 32, "text": text},
        "train": {"batch_size": 8, "grad_accum_steps": 1, "eval_batch_size": 8},
        "data": {"image_size": image_size, "max_txt_len": max_txt_len, "max_output_txt_len": 32},
    }


def build(family: str, device: str = "cpu", dtype: torch.dtype | None = None, seed: int = 0, **preset_kw):
    """(model, processor, preset) of the mid-size model of `family`."""
    preset = mid_preset(family, **preset_kw)
    model, processor = load_model(preset, dtype=dtype, device=device, seed=seed)
    return model, processor, preset


def settings_for(preset: dict, dataset: str = "scienceqa", **overrides):
    return resolve_settings(dataset, None, preset, overrides)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def evaluation_model(family: str, quick: bool, device: str, dtype: str, batch_size: int, **preset_kw):
    """(model, processor, preset, settings) for the evaluation benchmarks: the tiny preset for --quick smoke
    runs, else the mid-size model in `dtype`."""
    if quick:
        preset = load_preset(f"tiny-{family}")
        model, processor = load_model(preset, device=device)
        return model, processor, preset, resolve_settings(preset=preset, overrides={"eval_batch_size": batch_size})
    model, processor, preset = build(family, device=device, dtype=DTYPES[dtype], **preset_kw)
    return model, processor, preset, settings_for(preset, eval_batch_size=batch_size)


_WORDS = ("which of these states is farthest north the map shows a property of the material select the best "
          "answer an animal plant solid liquid gas weather climate magnet force push pull temperature").split()


def scienceqa_like_records(n: int, n_choices: int | tuple[int, int] = 4, seed: int = 0,
                           context_words: int = 10) -> list[dict]:
    """Processed ScienceQA-shaped records with ~128-token prompts (text-only: blank image)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = n_choices if isinstance(n_choices, int) else rng.randint(*n_choices)
        choices = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4))) for _ in range(k)]
        answer = rng.randrange(k)
        out.append({
            "question_id": f"bench-{i}", "image": None,
            "question": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 10))) + "?",
            "choices": choices, "answer_index": answer, "answer": f"({'abcde'[answer]}) {choices[answer]}",
            "context": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(context_words // 2, context_words))),
            "meta": {"subject": "natural science", "grade": f"grade{rng.randint(1, 12)}", "has_hint": True,
                     "has_image": False, "topic": "geography", "category": "bench"},
        })
    return out


def write_random_images(records: list[dict], root, size: int = 224, seed: int = 0) -> None:
    """Give each record its own random RGB image under `root` (for benchmarks that need real images)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for r in records:
        name = f"{r['question_id']}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name)
        r["image"] = name
        r["meta"]["has_image"] = True


def machine(device: str | torch.device | None = None) -> str:
    """The CPU, torch's threads, the device (`device`, else the first GPU if any) and torch's version."""
    device = torch.device(device) if device is not None else None
    dev = "cpu"
    if device is not None and device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    elif device is None and torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"device {dev}, torch {torch.__version__}")
