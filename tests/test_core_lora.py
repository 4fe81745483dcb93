"""Which modules get LoRA and which tensors train, for every experiment group (tiny models, CPU),
and the real-size accounting (meta device)."""
import json
import re
import subprocess
import sys

import pytest
import torch

from instructblip_peft.accounting import account
from instructblip_peft.errors import UserError
from instructblip_peft.experiments import get_experiment, parse_ids
from instructblip_peft.lora import apply_experiment, lora_module_names, trainable_parameters
from instructblip_peft.model import load_model, meta_model

# One ID per group, for each family (ranks vary too, so rank handling is exercised).
T5_GROUPS = {"1": "llm_ffn", "6": "llm_attn", "11": "llm_all", "16": "qformer_ffn", "17": "qformer_self",
             "22": "qformer_cross", "27": "qformer_all", "32": "qformer_llm_all"}
LLAMA_GROUPS = {str(int(k) + 32): v for k, v in T5_GROUPS.items()}


def expected_lora_modules(model, group: str, family: str) -> set[str]:
    """Written out from the paper's placement, independently of params/experiments.yaml."""
    names = {n for n, _ in model.named_modules()}
    q_layers = {int(m.group(1)) for n in names if (m := re.match(r"qformer\.encoder\.layer\.(\d+)$", n))}
    cross_layers = {i for i in q_layers if f"qformer.encoder.layer.{i}.crossattention" in names}
    q_self = {f"qformer.encoder.layer.{i}.attention.attention.{x}" for i in q_layers for x in ("query", "value")}
    q_cross = {f"qformer.encoder.layer.{i}.crossattention.{x}" for i in cross_layers
               for x in ("attention.query", "attention.key", "attention.value", "output.dense")}
    q_ffn = {f"qformer.encoder.layer.{i}.{x}.dense" for i in q_layers
             for x in ("intermediate", "output", "intermediate_query", "output_query")}
    if family == "t5":
        attn = {n for n in names if re.fullmatch(
            r"language_model\.(encoder|decoder)\.block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.(q|v)", n)}
        ffn = {n for n in names if re.fullmatch(r"language_model\..*DenseReluDense\.(wi_0|wi_1|wo)", n)}
    else:
        attn = {n for n in names if re.fullmatch(r"language_model\.model\.layers\.\d+\.self_attn\.(q_proj|v_proj)", n)}
        ffn = {n for n in names if re.fullmatch(r"language_model\.model\.layers\.\d+\.mlp\.(gate|up|down)_proj", n)}
    q_all = q_self | q_cross | q_ffn
    return {"llm_ffn": ffn, "llm_attn": attn, "llm_all": attn | ffn, "qformer_ffn": q_ffn,
            "qformer_self": q_self, "qformer_cross": q_cross, "qformer_all": q_all,
            "qformer_llm_all": q_all | attn | ffn}[group]


@pytest.fixture(scope="module")
def tiny():
    return {p: load_model(p) for p in ("tiny-t5", "tiny-llama")}


@pytest.mark.parametrize("exp_id,group", list(T5_GROUPS.items()) + list(LLAMA_GROUPS.items()))
def test_lora_goes_exactly_where_the_paper_put_it(tiny, exp_id, group):
    exp = get_experiment(exp_id)
    preset = "tiny-t5" if exp.family == "t5" else "tiny-llama"
    base, _ = load_model(preset)
    expected = expected_lora_modules(base, group, exp.family)
    assert expected, "the expectation itself must not be empty"
    model = apply_experiment(base, exp)
    assert set(lora_module_names(model)) == expected
    # Q-Former attention.output.dense is not ffn, and the ViT/LLM output projections never get LoRA.
    assert not any(n.endswith("attention.output.dense") and "crossattention" not in n for n in lora_module_names(model))
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and len(mod.lora_A):
            assert mod.r["default"] == exp.rank and mod.lora_alpha["default"] == 8


def _expected_trainable(name: str, exp) -> bool:
    if "lora_" in name:
        return True
    if name.startswith(("query_tokens", "language_projection.", "vision_model.post_layernorm.")):
        return True
    return exp.full_qformer and name.startswith("qformer.")


@pytest.mark.parametrize("exp_id", ["4", "15", "22", "32", "36", "64", "zeroshot-flant5xl", "qformer-ft-vicuna7b"])
def test_gradients_reach_exactly_the_trainable_tensors(exp_id, tiny):
    exp = get_experiment(exp_id)
    preset = "tiny-t5" if exp.family == "t5" else "tiny-llama"
    model, processor = load_model(preset)
    model = apply_experiment(model, exp)
    from instructblip_peft.lora import base_model
    # Make LoRA B non-zero so that gradients flow into every LoRA A as well.
    with torch.no_grad():
        for n, p in base_model(model).named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    batch = _batch(processor, exp.family)
    loss = model(**batch).loss
    if not exp.train:
        assert not trainable_parameters(model)
        return
    loss.backward()
    for name, p in base_model(model).named_parameters():
        should = _expected_trainable(name, exp)
        assert p.requires_grad == should, name
        if should:
            assert p.grad is not None, f"no gradient on trainable {name}"
        else:
            assert p.grad is None, f"gradient on frozen {name}"
    # The ViT and the LLM base weights are frozen in every experiment.
    assert not any(p.requires_grad for n, p in base_model(model).named_parameters()
                   if (n.startswith("vision_model.") and "post_layernorm" not in n)
                   or (n.startswith("language_model.") and "lora_" not in n))


def _batch(processor, family, colours=((255, 0, 0), (0, 0, 255))):
    from PIL import Image

    from instructblip_peft.data.batches import TrainCollator

    items = []
    for i, c in enumerate(colours):
        px = processor.image_processor(images=Image.new("RGB", (40, 40), c), return_tensors="pt")["pixel_values"][0]
        items.append({"pixel_values": px, "prompt": f"Question: what colour is shape {i}? Options: (a) red (b) blue",
                      "target": "(a) red" if i == 0 else "(b) blue"})
    return TrainCollator(processor, family, 64, 16)(items)


@pytest.mark.parametrize("preset", ["tiny-t5", "tiny-llama"])
def test_the_image_changes_the_loss(preset, tiny):
    """Guards the transformers 5.x trap: without image placeholders the image is silently ignored."""
    model, processor = tiny[preset]
    family = "t5" if preset == "tiny-t5" else "llama"
    batch = _batch(processor, family)
    other = dict(batch, pixel_values=batch["pixel_values"].flip(0))
    model.eval()
    with torch.no_grad():
        a, b = model(**batch), model(**other)
    # Random tiny models react weakly to anything; without placeholders the difference would be exactly 0.
    assert (a.logits - b.logits).abs().max() > 1e-5
    assert a.loss != b.loss
    n_placeholders = (batch["input_ids"] == model.config.image_token_id).sum(1)
    assert n_placeholders.tolist() == [model.config.num_query_tokens] * 2


@pytest.mark.parametrize("preset", ["tiny-t5", "tiny-llama"])
def test_save_pretrained_directory_loads_like_a_hub_id(preset, tmp_path, tiny):
    model, processor = tiny[preset]
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_proc = load_model(preset, source=str(tmp_path))
    family = "t5" if preset == "tiny-t5" else "llama"
    batch, batch2 = _batch(processor, family), _batch(loaded_proc, family)
    for k in batch:
        assert torch.equal(batch[k], batch2[k]), k
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch2).logits)


def test_saved_model_preprocesses_images_with_pil_whatever_is_installed(tmp_path, tiny, monkeypatch):
    """transformers 5 resolves a checkpoint's image processor to its torchvision variant when torchvision is
    installed (as on Colab), which resizes differently. Stand in such a variant (bilinear instead of the
    checkpoint's bicubic): the loaded processor is still PIL's, giving the tiny preset's pixels exactly."""
    from PIL import Image
    from transformers import AutoImageProcessor, BlipImageProcessorPil

    from instructblip_peft.data.batches import ImageTransform

    model, processor = tiny["tiny-t5"]
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    class TorchvisionLike(BlipImageProcessorPil):
        pass

    def auto(source, *args, **kwargs):
        return TorchvisionLike(**dict(processor.image_processor.to_dict(), resample=Image.BILINEAR))

    monkeypatch.setattr(AutoImageProcessor, "from_pretrained", auto)
    loaded, loaded_proc = load_model("tiny-t5", source=str(tmp_path), dtype=torch.bfloat16)
    assert type(loaded_proc.image_processor) is BlipImageProcessorPil
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    image = Image.fromarray(torch.randint(0, 256, (45, 61, 3), dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(0)).numpy())
    pixels = [ImageTransform(p.image_processor, 32)(image) for p in (processor, loaded_proc)]
    assert torch.equal(*pixels)
    assert not torch.equal(pixels[0], ImageTransform(auto(None), 32)(image))  # the stand-in would differ


def test_params_cli_all_64_consistent():
    out = subprocess.run([sys.executable, "-m", "instructblip_peft", "params", "1-64", "--json"],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["experiment"] for r in rows] == [str(i) for i in range(1, 65)]
    by = {r["experiment"]: r for r in rows}
    # The paper's figures.
    assert by["28"]["trainable_params"] == 3_728_128 and round(100 * by["28"]["trainable_share_of_full_qformer"], 2) == 1.99
    assert by["64"]["trainable_params"] == 21_097_216 and round(100 * by["64"]["trainable_share_of_full_qformer"], 2) == 11.17
    assert by["4"]["trainable_params"] == 195_520_000
    for first in range(1, 65, 4):  # a group: ranks 1, 2, 4, 8
        group = [by[str(first + k)] for k in range(4)]
        base_lora = group[0]["lora_params"]
        assert base_lora > 0
        for g, rank in zip(group, (1, 2, 4, 8)):
            assert g["rank"] == rank and g["lora_params"] == rank * base_lora  # LoRA size is linear in rank
            # non-LoRA trainable and non-LoRA total do not depend on the rank
            assert g["trainable_params"] - g["lora_params"] == group[0]["trainable_params"] - base_lora
            assert g["total_params"] - g["lora_params"] == group[0]["total_params"] - base_lora
            assert g["lora_params"] <= g["trainable_params"] < g["total_params"]
    # Q-Former+LLM all = Q-Former all + LLM all, rank by rank.
    for off in (0, 32):
        for k in range(4):
            qa, la, both = by[str(25 + off + k)], by[str(9 + off + k)], by[str(29 + off + k)]
            assert both["lora_params"] == qa["lora_params"] + la["lora_params"]
    # Vicuna rows and FlanT5 rows share the Q-Former: Q-Former-only LoRA sizes agree.
    for k in range(13, 29):
        assert by[str(k)]["lora_params"] == by[str(k + 32)]["lora_params"]


def test_meta_model_allocates_nothing():
    model = meta_model("vicuna7b")
    assert all(p.is_meta for p in model.parameters())
    assert account("64")["total_params"] > 7_000_000_000


@pytest.mark.parametrize("bad,message", [
    ("65", "unknown experiment ID '65'"), ("0", "unknown experiment ID"), ("abc", "Valid IDs: 1-64"),
])
def test_unknown_experiment_ids_list_the_valid_ones(bad, message):
    with pytest.raises(UserError, match=message):
        get_experiment(bad)


def test_id_ranges():
    assert parse_ids("1-4,28") == ["1", "2", "3", "4", "28"]
    assert len(parse_ids("1-64")) == 64
    with pytest.raises(UserError, match="start is after end"):
        parse_ids("9-3")
    with pytest.raises(UserError, match="unknown experiment ID '65'"):
        parse_ids("60-70")
