"""Evaluation: batched ranking equals the original one-forward-per-candidate method; breakdowns; parsing."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from instructblip_peft.config import resolve_settings
from instructblip_peft.data.batches import encode_prompts, pad, pad_id
from instructblip_peft.data.prompts import render_prompt
from instructblip_peft.errors import UserError
from instructblip_peft.evaluate import (VisionCache, breakdown, evaluate, parse_choice, score_naive,
                                        vision_cache_for)
from instructblip_peft.experiments import get_experiment
from instructblip_peft.lora import apply_experiment, base_model
from instructblip_peft.model import load_model, load_preset

FAMILIES = {"t5": ("tiny-t5", "29"), "llama": ("tiny-llama", "61")}  # 29/61: LoRA in Q-Former and LLM


def _records(image_root, n=7, seed=0):
    """Prompts of clearly different lengths, 2-5 candidates of different lengths, some text-only."""
    rng = random.Random(seed)
    words = "red blue circle square which shape color left right big small the of".split()
    out = []
    for i in range(n):
        k = 2 + i % 4
        choices = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(k)]
        image = None
        if i % 3:
            image = f"img{i}.png"
            arr = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(image_root / image)
        out.append({"question_id": f"q{i}", "image": image,
                    "question": " ".join(rng.choice(words) for _ in range(2 + 5 * i)) + "?",
                    "choices": choices, "answer_index": i % k, "answer": "", "context": "context " * (i % 3),
                    "meta": {}})
    return out


def _settings(preset, **overrides):
    return resolve_settings(preset=load_preset(preset), overrides={"eval_batch_size": 3, **overrides})


@pytest.fixture(scope="module", params=["t5", "llama"])
def lora_model(request):
    """A tiny model with an experiment's LoRA applied and every LoRA weight non-zero (B starts at 0)."""
    family = request.param
    preset, exp_id = FAMILIES[family]
    model, processor = load_model(preset, seed=1)
    model = apply_experiment(model, get_experiment(exp_id))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model, processor, family, preset


def _assert_same(result, naive):
    for pred, ref in zip(result.predictions, naive, strict=True):
        assert pred["predicted"] == min(range(len(ref)), key=ref.__getitem__)
        np.testing.assert_allclose(pred["scores"], ref, rtol=1e-4)


def test_batched_ranking_equals_naive_with_lora(lora_model, tmp_path):
    model, processor, family, preset = lora_model
    records = _records(tmp_path)
    settings = _settings(preset)
    naive = score_naive(model, processor, records, tmp_path, "scienceqa", settings, family)
    assert [len(s) for s in naive] == [len(r["choices"]) for r in records]
    result = evaluate(model, processor, records, tmp_path, "scienceqa", settings, family, progress=False)
    _assert_same(result, naive)
    assert [p["question_id"] for p in result.predictions] == [r["question_id"] for r in records]
    flags = [p["correct"] for p in result.predictions]
    assert result.accuracy == pytest.approx(sum(flags) / len(flags))
    assert all(p["correct"] == (p["predicted"] == p["answer"]) for p in result.predictions)


def test_vision_cache_gives_the_same_scores_and_applies_post_layernorm_live(lora_model, tmp_path):
    model, processor, family, preset = lora_model
    records = _records(tmp_path, seed=3)
    settings = _settings(preset)
    cache = VisionCache()
    first = evaluate(model, processor, records, tmp_path, "scienceqa", settings, family, vision_cache=cache,
                     progress=False)
    images = {(r["image"]) for r in records}
    assert len(cache) == len(images)  # text-only questions share one blank image
    # post_layernorm trains in every experiment: a changed layer norm must change the cached evaluation too.
    ln = base_model(model).vision_model.post_layernorm
    old = ln.weight.detach().clone()
    try:
        with torch.no_grad():
            ln.weight.mul_(torch.linspace(0.5, 1.5, ln.weight.numel()))
        misses = cache.misses
        second = evaluate(model, processor, records, tmp_path, "scienceqa", settings, family, vision_cache=cache,
                          progress=False)
        assert cache.misses == misses  # nothing re-encoded
        naive = score_naive(model, processor, records, tmp_path, "scienceqa", settings, family)
        _assert_same(second, naive)
        assert second.predictions[0]["scores"] != first.predictions[0]["scores"]
    finally:
        with torch.no_grad():
            ln.weight.copy_(old)


def test_evaluation_restores_training_mode_and_limits_samples(lora_model, tmp_path):
    model, processor, family, preset = lora_model
    records = _records(tmp_path, n=5)
    model.train()
    result = evaluate(model, processor, records, tmp_path, "scienceqa", _settings(preset, max_eval_samples=2),
                      family, progress=False)
    assert model.training
    assert len(result.predictions) == 2
    accuracy, predictions, parts = result  # the tuple form of the engine contract
    assert accuracy == result.accuracy and predictions is result.predictions and parts is result.breakdown
    model.eval()
    evaluate(model, processor, records[:1], tmp_path, "scienceqa", _settings(preset), family, progress=False)
    assert not model.training


@pytest.mark.parametrize("preset, family", [("tiny-t5", "t5"), ("tiny-llama", "llama")])
def test_the_image_changes_the_scores(tmp_path, preset, family):
    model, processor = load_model(preset)
    settings = _settings(preset)
    rec = _records(tmp_path, n=2)[1]  # has an image
    variants = [rec, dict(rec, question_id="same"), dict(rec, question_id="blank", image=None)]
    scores = [evaluate(model, processor, [r], tmp_path, "scienceqa", settings, family, progress=False)
              .predictions[0]["scores"] for r in variants]
    # A random tiny model listens to its image only faintly, but it must listen: the same image gives the
    # same scores bit for bit, another image different ones.
    assert scores[0] == scores[1]
    assert all(a != b for a, b in zip(scores[0], scores[2]))


# (question, choices, answer_index, what the LLM "generates", the choice it must be read as: -1 = none)
GENERATED = [
    ("which color is the big circle on the left of the picture?", ["red", "blue"], 1, "(b) blue", 1),
    ("which color?", ["red", "blue", "green"], 2, "nonsense", -1),
    ("which shape is shown in the small picture at the top?", ["circle", "square"], 0, "Square.", 1),
    ("is it a star?", ["yellow", "purple"], 1, "(e)", -1),
    ("which of these is the top one in the picture on the right?", ["left", "right", "top"], 0,
     "the answer is (a)", 0),
]


def test_generate_mode_parses_what_the_llm_generates(lora_model, tmp_path, monkeypatch):
    """The LLM's generate is replaced by one that answers each question with a known text; the predictions,
    their correctness and the accuracy must follow from those texts, in the records' order."""
    model, processor, family, preset = lora_model
    records = [{"question_id": f"g{i}", "image": None, "question": q, "choices": choices, "answer_index": answer,
                "answer": "", "context": "", "meta": {}} for i, (q, choices, answer, _, _) in enumerate(GENERATED)]
    settings = _settings(preset, eval_mode="generate", max_output_txt_len=7)  # eval_batch_size 3: two batches
    # The stub tells the questions apart by their prompt's length (placeholders + prompt tokens).
    widths = [len(ids) for ids in encode_prompts(processor, [render_prompt(r, "iconqa") for r in records],
                                                 settings.max_txt_len)["input_ids"]]
    assert len(set(widths)) == len(widths)
    answer_for = {w: g[3] for w, g in zip(widths, GENERATED)}
    tok = processor.tokenizer
    calls = []

    def generate(*, inputs_embeds, attention_mask, **kwargs):
        calls.append(kwargs)
        assert inputs_embeds.shape[:2] == attention_mask.shape
        texts = [answer_for[int(w)] for w in attention_mask.sum(-1)]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        if family == "t5":  # an encoder-decoder's output starts with the decoder start token
            ids = [[lm.config.decoder_start_token_id] + x for x in ids]
        return pad(ids, pad_id(tok))

    lm = base_model(model).language_model
    monkeypatch.setattr(lm, "generate", generate)
    result = evaluate(model, processor, records, tmp_path, "iconqa", settings, family, progress=False)

    assert len(calls) == 2
    assert all(c["do_sample"] is False and c["max_new_tokens"] == 7 for c in calls)
    assert [p["question_id"] for p in result.predictions] == [r["question_id"] for r in records]
    assert [p["generated"].strip() for p in result.predictions] == [g[3] for g in GENERATED]
    assert [p["predicted"] for p in result.predictions] == [g[4] for g in GENERATED]
    assert [p["correct"] for p in result.predictions] == [True, False, False, False, True]
    assert result.accuracy == pytest.approx(2 / 5)
    assert result.mode == "generate" and all(p["scores"] == [] for p in result.predictions)


@pytest.mark.parametrize("text, expected", [
    ("(b) blue circle", 1), ("(B)", 1), ("b", 1), ("b.", 1), ("c)", 2), ("  Blue Circle. ", 1),
    ("red", 0), ("the answer is (c)", 2), ("(e)", None), ("e", None), ("purple", None), ("", None),
    ("(a) red", 0),
])
def test_parse_choice(text, expected):
    assert parse_choice(text, ["red", "blue circle", "green"]) == expected


def _sqa(subject, grade, hint, image, topic):
    return {"meta": {"subject": subject, "grade": grade, "has_hint": hint, "has_image": image, "topic": topic}}


def test_scienceqa_breakdown_arithmetic():
    records = [
        _sqa("natural science", "grade2", True, True, "physics"),     # right
        _sqa("natural science", "grade8", False, True, "physics"),    # wrong
        _sqa("social science", "grade5", True, False, "geography"),   # right
        _sqa("natural science", "grade12", False, False, "biology"),  # right
    ]
    b = breakdown(records, [True, False, True, True], "scienceqa")
    assert b == {"NAT": pytest.approx(2 / 3), "SOC": 1.0, "TXT": 1.0, "IMG": 0.5, "NO": 1.0,
                 "G1-6": 1.0, "G7-12": 0.5, "topic:biology": 1.0, "topic:geography": 1.0, "topic:physics": 0.5}
    assert "LAN" not in b  # no language-science question: absent, not 0


def test_iconqa_breakdown_counts_each_skill():
    records = [{"meta": {"grade": "prek", "skills": ["counting", "colors"]}},
               {"meta": {"grade": "prek", "skills": ["counting"]}},
               {"meta": {"grade": "grade1", "skills": []}}]
    b = breakdown(records, [True, False, False], "iconqa")
    assert b == {"grade:grade1": 0.0, "grade:prek": 0.5, "skill:colors": 1.0, "skill:counting": 0.5}


def test_custom_breakdown_is_empty_and_lengths_must_match():
    assert breakdown([{"meta": {"subject": "natural science"}}], [True], "custom") == {}
    with pytest.raises(ValueError):
        breakdown([{}], [], "scienceqa")


def test_vision_cache_follows_the_setting():
    assert isinstance(vision_cache_for(resolve_settings(overrides={"eval_vision_cache": True})), VisionCache)
    assert vision_cache_for(resolve_settings(overrides={"eval_vision_cache": False})) is None
    capped = vision_cache_for(resolve_settings(overrides={"eval_vision_cache_ram_gb": 0.5}))
    assert capped.max_ram_bytes == 2**29


@pytest.mark.parametrize("ram_images", [0, 1])
def test_vision_cache_beyond_its_ram_cap_spills_to_a_file_with_identical_scores(lora_model, tmp_path, ram_images):
    model, processor, family, preset = lora_model
    records = _records(tmp_path, seed=3)
    settings = _settings(preset)
    plain = evaluate(model, processor, records, tmp_path, "scienceqa", settings, family, progress=False)
    in_ram = VisionCache()
    evaluate(model, processor, records, tmp_path, "scienceqa", settings, family, vision_cache=in_ram, progress=False)
    per_image = in_ram.nbytes() // len(in_ram)
    spill = tmp_path / "run" / "eval_vision_cache.0.bin"
    cache = VisionCache(max_ram_bytes=ram_images * per_image, spill_path=spill)
    for _ in range(2):  # encoding (written to the file), then reading back from it
        result = evaluate(model, processor, records, tmp_path, "scienceqa", settings, family, vision_cache=cache,
                          progress=False)
        assert result.predictions == plain.predictions  # scores bit for bit
    assert cache.ram_bytes == ram_images * per_image
    assert cache.spilled_bytes == (len(in_ram) - ram_images) * per_image and spill.stat().st_size > 0
    cache.close()
    assert not spill.exists() and len(cache) == 0


def test_vision_cache_spill_on_a_full_disk_is_a_user_error(tmp_path, monkeypatch):
    import errno
    import os

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    cache = VisionCache(max_ram_bytes=0, spill_path=tmp_path / "spill.bin")
    with pytest.raises(UserError, match=r"spill.bin: cannot write the evaluation vision cache \(No space left"):
        cache.put("image@224", torch.zeros(3, 4))
    cache.close()


def test_vision_cache_is_not_used_while_the_vit_trains(tmp_path):
    model, processor = load_model("tiny-t5")  # nothing frozen: the ViT's output could change between epochs
    cache = VisionCache()
    with pytest.warns(UserWarning, match="vision encoder has trainable weights"):
        evaluate(model, processor, _records(tmp_path, n=2), tmp_path, "scienceqa", _settings("tiny-t5"), "t5",
                 vision_cache=cache, progress=False)
    assert len(cache) == 0
