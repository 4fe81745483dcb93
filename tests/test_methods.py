"""The method axis (-p peft_method lora|dora|rslora|adalora|ia3) and quantization (-p quantize none|4bit|8bit):
exact parameter counts on the real-size architectures, placement on the tiny models, run names that never
collide, one-line errors for bad settings, and the static memory of QLoRA."""
import json
import subprocess
import sys

import pytest
import torch

import train_fixtures  # noqa: F401  (one thread: tiny models on a shared CPU)
from instructblip_peft.accounting import account, memory_estimate
from instructblip_peft.config import resolve_settings, validate_overrides
from instructblip_peft.errors import UserError
from instructblip_peft.experiments import get_experiment, method_suffix, run_name, run_names
from instructblip_peft.lora import apply_experiment, lora_module_names, trainable_parameters
from instructblip_peft.model import load_model

METHODS = ["lora", "dora", "rslora", "adalora", "ia3"]


def settings(**kw):
    return resolve_settings(overrides=kw)


# ---------------------------------------------------------------- exact accounting (meta device)

def test_dora_adds_one_magnitude_per_adapted_module_and_lora_figures_stay():
    lora28, dora28 = account("28"), account("28", overrides={"peft_method": "dora"})
    lora64, dora64 = account("64"), account("64", overrides={"peft_method": "dora"})
    assert (lora28["trainable_params"], lora64["trainable_params"]) == (3_728_128, 21_097_216)
    assert (dora28["trainable_params"], dora64["trainable_params"]) == (3_857_152, 22_323_968)
    # 28: 96 Q-Former modules (768 wide, the FFN intermediates 3072); 64 adds 160 LLaMA modules.
    assert dora28["trainable_params"] - lora28["trainable_params"] == 12 * (2 * 768 + 2 * 3072 + 2 * 768) + 6 * 4 * 768
    assert dora64["peft_method"] == "dora" and round(100 * dora28["trainable_share_of_full_qformer"], 2) == 2.06


def test_rslora_adalora_ia3_counts():
    lora = account("28")
    assert account("28", overrides={"peft_method": "rslora"})["trainable_params"] == lora["trainable_params"]
    # AdaLoRA trains P (r x in), Q (out x r) and the r singular values at its initial rank 12 = ceil(1.5 * 8).
    ada = account("28", overrides={"peft_method": "adalora"})
    per_rank = lora["lora_params"] // 8
    assert ada["lora_params"] == 12 * per_rank + 12 * 96
    # IA3: one vector per module, of the input size for the FFN's output layers (feed-forward), else of the
    # output size: self-attn 2x768, cross-attn 4x768 (every other layer), FFN 3072+3072 (outputs scale their
    # 3072 inputs) + 3072+3072 (intermediates scale their outputs).
    ia3 = account("25", overrides={"peft_method": "ia3"})
    assert ia3["lora_params"] == 12 * 2 * 768 + 6 * 4 * 768 + 12 * 4 * 3072
    assert ia3["rank"] is None and ia3["peft_method"] == "ia3"


def test_params_cli_takes_the_method():
    out = subprocess.run([sys.executable, "-m", "instructblip_peft", "params", "28,64", "--json", "-p", "peft_method",
                          "dora"], capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["trainable_params"] for r in rows] == [3_857_152, 22_323_968]


# ---------------------------------------------------------------- placement on the tiny models

@pytest.fixture(scope="module")
def tiny():
    return {f: load_model(p) for f, p in (("t5", "tiny-t5"), ("llama", "tiny-llama"))}


@pytest.mark.parametrize("method", METHODS[1:])
@pytest.mark.parametrize("exp_id", ["29", "61"])
def test_every_method_adapts_exactly_the_lora_modules(tiny, exp_id, method):
    exp = get_experiment(exp_id)
    base, _ = load_model("tiny-t5" if exp.family == "t5" else "tiny-llama")
    expected = lora_module_names(apply_experiment(base, exp))
    base, _ = load_model("tiny-t5" if exp.family == "t5" else "tiny-llama")
    model = apply_experiment(base, exp, settings(peft_method=method))
    assert lora_module_names(model) == expected
    trainable = trainable_parameters(model)
    modules = dict(model.get_base_model().named_modules())
    for name in expected:
        m = modules[name]
        if method == "ia3":
            vec = m.ia3_l["default"]
            feedforward = name.endswith(("output.dense", "output_query.dense", ".wo", "down_proj")) \
                and "crossattention" not in name
            assert m.is_feedforward == feedforward, name
            assert vec.numel() == (m.in_features if feedforward else m.out_features), name
        elif method == "adalora":
            assert m.lora_E["default"].shape == (2, 1) and m.r["default"] == 2  # ceil(1.5 * rank 1)
        elif method == "dora":
            assert m.lora_magnitude_vector["default"].weight.numel() == m.out_features
        elif method == "rslora":
            assert m.scaling["default"] == pytest.approx(8 / exp.rank ** 0.5)
    assert all(p.requires_grad for n, p in trainable.items())


def test_lora_alpha_and_dropout_are_settings(tiny):
    model = apply_experiment(load_model("tiny-t5")[0], get_experiment("31"), settings(lora_alpha=16, lora_dropout=0.1))
    m = dict(model.get_base_model().named_modules())["qformer.encoder.layer.0.attention.attention.query"]
    assert m.scaling["default"] == 16 / 4 and m.lora_dropout["default"].p == 0.1


# ---------------------------------------------------------------- run names

def test_run_names_never_collide():
    assert method_suffix(settings()) == ""
    assert run_name("28", settings(peft_method="dora")) == "28+dora"
    assert run_name("28", settings(quantize="4bit")) == "28+4bit"
    assert run_name("64", settings(peft_method="adalora", quantize="8bit")) == "64+adalora+8bit"
    assert run_name("zeroshot-vicuna7b", settings(peft_method="dora", quantize="4bit")) == "zeroshot-vicuna7b+4bit"
    # IA3 has no rank: a group's four ranks are one run, named by its rank-1 ID.
    assert run_names(["25", "26", "27", "28", "31"], settings(peft_method="ia3")) == ["25+ia3", "29+ia3"]
    names = {run_name(i, settings(peft_method=m, quantize=q)) for i in ("28", "64") for m in METHODS
             for q in ("none", "4bit", "8bit")}
    assert len(names) == 2 * (4 * 3 + 3)  # ia3 collapses 28 -> 25 and 64 -> 61, still distinct


def test_ia3_refuses_a_rank_other_than_the_groups_first(tmp_path):
    from instructblip_peft.train import train
    with pytest.raises(UserError, match=r"ia3 has no rank: experiments 25-28 .* run ID 25"):
        train("scienceqa", "28", tmp_path, preset="tiny", peft_method="ia3")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("overrides,message", [
    ({"peft_method": "loha"}, r"'peft_method' must be one of \['lora', 'dora', 'rslora', 'adalora', 'ia3'\]"),
    ({"quantize": "2bit"}, r"'quantize' must be one of \['none', '4bit', '8bit'\]"),
    ({"lora_dropout": 1.5}, r"'lora_dropout' must be in \[0, 1\)"),
    ({"lora_alpha": 0}, "'lora_alpha' must be positive"),
    ({"adalora_init_rank_factor": 1.0}, "'adalora_init_rank_factor' must be above 1"),
])
def test_bad_method_settings_are_one_clear_error(overrides, message):
    with pytest.raises(UserError, match=message):
        validate_overrides(overrides)


def test_adalora_schedule_must_leave_room_for_pruning():
    with pytest.raises(UserError, match=r"'adalora_tinit' \+ 'adalora_tfinal' must be below 1"):
        resolve_settings(overrides={"peft_method": "adalora", "adalora_tinit": 0.5, "adalora_tfinal": 0.5})


# ---------------------------------------------------------------- QLoRA memory

def test_quantized_bytes_match_what_bitsandbytes_holds():
    """memory_estimate's byte count of the quantized LLM equals what bitsandbytes allocates, on the tiny
    LLaMA (fp32 elsewhere); on Vicuna-7B, 4-bit holds the frozen model in well under half of bf16."""
    import bitsandbytes as bnb

    for quantize in ("4bit", "8bit"):
        model, _ = load_model("tiny-llama", quantize=quantize)
        held = 0
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                qs = m.weight.quant_state
                held += m.weight.numel() + sum(t.numel() * t.element_size() for t in (
                    qs.absmax, qs.code, qs.offset.reshape(1), qs.state2.absmax, qs.state2.code))
            elif isinstance(m, bnb.nn.Linear8bitLt):
                held += m.weight.numel() + m.weight.SCB.numel() * 4
            elif isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32 and "language_model" in str(m):
                pass
        est = memory_estimate("33", "tiny-llama", {"quantize": quantize}, dtype_bytes=4)
        plain = memory_estimate("33", "tiny-llama", {}, dtype_bytes=4)
        quantized_fp32 = 4 * est["quantized_params"]
        assert est["frozen_bytes"] - (plain["frozen_bytes"] - quantized_fp32) == held, quantize
    bf16, q4 = memory_estimate("64"), memory_estimate("64", overrides={"quantize": "4bit"})
    assert q4["quantized_params"] > 6_400_000_000 and q4["frozen_bytes"] < 0.42 * bf16["frozen_bytes"]


def test_a_finished_run_of_another_method_is_not_taken_for_this_one(tmp_path):
    """Until a run's directory says its method, a LoRA run's directory must not answer for DoRA."""
    from instructblip_peft.io import write_json
    from instructblip_peft.train import train
    write_json(tmp_path / "metrics.json", {"status": "finished", "dataset": "scienceqa", "experiment": "31",
                                           "preset": "tiny-t5", "val_accuracy": 0.5, "test_accuracy": 0.5})
    with pytest.raises(UserError, match="holds a finished run of peft_method 'lora', not 'dora'"):
        train("scienceqa", "31", tmp_path, preset="tiny", progress=False, peft_method="dora")
    assert train("scienceqa", "31", tmp_path, preset="tiny", progress=False)["val_accuracy"] == 0.5


def test_tiny_presets_take_their_per_method_learning_rate():
    from instructblip_peft.model import load_preset
    exp = get_experiment("61")
    resolve = lambda **kw: resolve_settings("scienceqa", exp, load_preset("tiny-llama"), kw)  # noqa: E731
    assert resolve(peft_method="ia3").learning_rate == 3e-2       # presets.yaml: method_train
    assert resolve(peft_method="dora").learning_rate == 3e-3      # the preset's own
    assert resolve(peft_method="ia3", learning_rate=1e-3).learning_rate == 1e-3  # the user's wins
    assert resolve_settings("scienceqa", exp, load_preset("vicuna7b"), {"peft_method": "ia3"}).learning_rate == 1e-4
