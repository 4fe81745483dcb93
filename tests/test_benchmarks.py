"""The benchmark scripts stay runnable: each runs in its tiny mode on CPU and reports sane figures."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from instructblip_peft.model import load_preset

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from threads; on a shared CPU extra threads only spin.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_train_step_padding_modes_keep_per_sample_losses(family, tmp_path):
    bench = load("train_step")
    out = tmp_path / "train_step.json"
    bench.main(["--tiny", "--family", family, "--batches", "1", "--samples", "32", "--no-count-flops",
                "--json", str(out)])
    result = json.loads(out.read_text())["results"][0]
    # The per-sample loss does not depend on padding or on the other samples of the batch.
    assert result["max_per_sample_loss_diff"] < 1e-4
    modes = result["modes"]
    assert set(modes) == {"static", "dynamic", "grouped"}
    assert all(m["samples_per_s"] > 0 and m["mean_loss"] > 0 for m in modes.values())
    # Static batches are always padded to the full prompt width; dynamic padding of the same batches never
    # exceeds it. (Grouped batches are other batches: for LLaMA their answers, part of the width, differ.)
    assert modes["dynamic"]["mean_llm_width"] <= modes["static"]["mean_llm_width"]
    # Static width: placeholders + max_txt_len prompt tokens (+ the batch's longest answer for LLaMA).
    static_prompt = load_preset(f"tiny-{family}")["tiny"]["num_query_tokens"] + result["max_txt_len"]
    if family == "t5":
        assert modes["static"]["mean_llm_width"] == static_prompt
    else:
        assert modes["static"]["mean_llm_width"] > static_prompt
    # Every mode timed the same number of samples (the untimed warm-up batch not among them) ...
    for m in modes.values():
        assert m["samples_per_s"] * m["seconds"] == pytest.approx(result["batches"] * result["batch_size"])
    # ... and the reported speedups are the ratios of the measured throughputs, the right way round.
    rate = {name: m["samples_per_s"] for name, m in modes.items()}
    assert result["speedup_grouped_vs_static"] == pytest.approx(rate["grouped"] / rate["static"])
    assert result["speedup_dynamic_vs_static"] == pytest.approx(rate["dynamic"] / rate["static"])
    assert result["speedup_grouped_vs_dynamic"] == pytest.approx(rate["grouped"] / rate["dynamic"])


def test_mixes_have_the_intended_length_spread():
    bench = load("train_step")
    science = bench.synthetic_records(200, "scienceqa", seed=0)
    icon = bench.synthetic_records(200, "iconqa", seed=0)
    words = [len(r["context"].split()) for r in science]
    assert sum(w == 0 for w in words) > 10 and max(words) > 300  # no context .. long lectures
    assert all(r["context"] == "" for r in icon)
    assert bench.synthetic_records(5, "scienceqa", seed=3) == bench.synthetic_records(5, "scienceqa", seed=3)


def test_static_padding_pads_to_max_txt_len_and_keeps_labels():
    bench = load("train_step")
    from instructblip_peft.data.batches import TrainCollator
    from instructblip_peft.model import load_model

    for family in ("t5", "llama"):
        _, processor = load_model(f"tiny-{family}")
        collator = TrainCollator(processor, family, max_txt_len=40, max_output_txt_len=16)
        items = [{"prompt": "which color is the shape", "target": "(a) red"},
                 {"prompt": "big small red", "target": "(b) blue green"}]
        items = [dict(it, pixel_values=torch.zeros(3, 32, 32)) for it in items]
        dynamic, static = collator(items), bench.StaticPadCollator(collator)(items)
        assert static["qformer_input_ids"].shape[1] == 40
        n_query = processor.num_query_tokens
        extra = static["input_ids"].shape[1] - dynamic["input_ids"].shape[1]
        assert static["input_ids"].shape[1] >= n_query + 40
        # The real tokens and their labels are unchanged; only padding (masked, ignored) is added.
        width = dynamic["input_ids"].shape[1]
        assert torch.equal(static["input_ids"][:, :width], dynamic["input_ids"])
        assert torch.equal(static["attention_mask"][:, width:], torch.zeros(2, extra, dtype=torch.long))
        if family == "llama":
            assert torch.equal(static["labels"][:, :width], dynamic["labels"])
            assert (static["labels"][:, width:] == -100).all()
        else:
            assert torch.equal(static["labels"], dynamic["labels"])


def test_gpu_real_size_runs_tiny_on_cpu(tmp_path, capsys):
    bench = load("gpu_real_size")
    out = tmp_path / "gpu.json"
    bench.main(["--tiny", "--experiments", "32", "64", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                "--json", str(out)])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert "MFU" in table[0] and "largest batch 24 GB / 40 GB / 80 GB" in table[0]
    rows = [line.split(" | ")[0:3] for line in table[1:]]
    assert rows == [["| 32", "tiny-t5", "off"], ["| 32", "tiny-t5", "on"], ["| 64", "tiny-llama", "off"],
                    ["| 64", "tiny-llama", "on"]]
    rows = json.loads(out.read_text())["results"]
    assert [r["experiment"] for r in rows] == ["32", "64"]
    for row in rows:
        assert row["attention"]["text"] == "sdpa"
        assert [r["checkpointing"] for r in row["runs"]] == [False, True]
        # FlopCounterMode and the 4/6 x params x tokens formula agree roughly (attention scores and
        # norms are what the formula leaves out).
        assert 0.5 < row["estimated_flops"] / row["counted_flops"] < 2
        for r in row["runs"]:
            assert r["losses_finite"] and r["samples_per_s"] > 0 and r["tflops"] > 0


def test_gpu_real_size_refuses_real_size_on_cpu():
    bench = load("gpu_real_size")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        bench.main(["--experiments", "32"])


def test_memory_benchmark_measures_loading_and_the_capped_cache(tmp_path):
    bench = load("memory")
    bench.save_model(tmp_path / "model", tiny=True, dtype_name="bfloat16")
    loaded = bench.child_load(str(tmp_path / "model"), "bfloat16", "load_model")
    assert loaded["checkpoint_bytes"] > 0 and loaded["peak_rss"] >= loaded["rss_before"] > 0
    assert loaded["param_bytes"] >= loaded["checkpoint_bytes"] * 0.9 and loaded["checksum_finite"]
    per_image = 17 * 64 * 2
    cache = bench.child_cache(40, 10 * per_image, [17, 64], str(tmp_path / "eval_vision_cache.0.bin"))
    assert cache["bytes_per_image"] == per_image
    assert cache["ram_bytes"] == 10 * per_image and cache["spilled_bytes"] == 30 * per_image
    assert cache["read_back_ok"] and cache["spill_removed"]


def test_trainer_race_runs_both_loops_and_both_evaluations(tmp_path):
    bench = load("trainer_race")
    out = tmp_path / "race.json"
    assert bench.main(["--quick", "--steps", "2", "--warmup", "1", "--checkpoint-every", "1",
                       "--eval-questions", "3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    # Both loops trained on batches of one shape, and the printed ratio is that of the measured rates.
    assert r["uniform_shapes"]
    assert r["ours_samples_per_s"] > 0 and r["trainer_samples_per_s"] > 0
    assert r["train_ratio"] == pytest.approx(r["ours_samples_per_s"] / r["trainer_samples_per_s"])
    assert {name: len(t) for name, t in r["step_seconds"].items()} == {"ours": 3, "Trainer": 3}
    # The Trainer route (one forward per candidate) ranks exactly like our batched evaluation.
    ev = r["eval"]
    assert ev["same_predictions"] and ev["max_rel_score_diff"] < 1e-4
    assert ev["candidates"] > ev["questions"] == 3
    assert ev["speedup"] == pytest.approx(min(ev["trainer_s"]) / min(ev["ours_s"]))


def test_train_vision_cache_benchmark_skips_the_vit_with_identical_losses(tmp_path):
    bench = load("train_vision_cache")
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    # Epoch 1 filled the cache (the ViT ran), epoch 2 skipped it on every batch; losses equal bit for bit.
    assert r["vit_batches"] == 2 and r["reused_batches"] == 2 and r["max_rel_loss_diff"] == 0.0
    assert r["epoch2_vs_epoch1"] == pytest.approx(r["cache_epoch2_samples_per_s"] / r["cache_epoch1_samples_per_s"])
    assert r["epoch2_vs_no_cache"] == pytest.approx(r["cache_epoch2_samples_per_s"] / r["plain_epoch2_samples_per_s"])
    # FlanT5-XL's shares, counted on the meta device: the ViT forward is over a third of a step.
    assert 0.3 < r["real_shares"]["vit"] < 0.45 and sum(r["real_shares"][k] for k in ("vit", "qformer", "llm")) == \
        pytest.approx(1.0)
