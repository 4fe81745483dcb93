"""Data-parallel training and evaluation on CPU: two processes learn the task as well as one, each on half the
batches; evaluation split across two processes gives exactly one process's predictions.

The processes are started as a user would: `accelerate launch --multi_gpu --num_processes 2`, which on a
machine without GPUs runs two CPU processes in a gloo process group (accelerate's MULTI_CPU). Note that
`accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.15: --cpu picks its
single-process launcher."""
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from train_fixtures import FAST, SINGLE_THREAD_ENV, make_colour_dataset

# Q-Former + LLM LoRA (rank 4, FlanT5 family). With two processes each takes its own batch of 4, so an
# epoch has half the optimizer steps; the extra epochs give both runs room to learn the colours.
EXPERIMENT = "31"
SETTINGS = dict(FAST, epochs=6, learning_rate=1e-2, max_train_samples=64, max_eval_samples=16, early_stopping_patience=6)

DRIVER = textwrap.dedent("""
    import json, sys
    from instructblip_peft.train import train
    out, data, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    train("scienceqa", "{experiment}", out, dataset_dir=data, preset="tiny", progress=False, **settings)
""").format(experiment=EXPERIMENT)


def launch(driver, processes: int, args: list[str]) -> None:
    launcher = [sys.executable, str(driver)] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(driver)]
    env = dict(os.environ, **SINGLE_THREAD_ENV)
    proc = subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def run(tmp_path, data, name: str, processes: int) -> dict:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / name
    launch(driver, processes, [str(out), str(data), json.dumps(SETTINGS)])
    return json.loads((out / "metrics.json").read_text())


def test_two_processes_reach_the_accuracy_band_of_one(tmp_path):
    data = make_colour_dataset(tmp_path / "processed", n_train=64, n_eval=16)
    one = run(tmp_path, data, "one", 1)
    two = run(tmp_path, data, "two", 2)
    print(f"val accuracy: 1 process {one['val_accuracy']:.3f}, 2 processes {two['val_accuracy']:.3f}; "
          f"test: {one['test_accuracy']:.3f} vs {two['test_accuracy']:.3f}")
    # Two colours per question (chance 0.5); 16 eval questions, so one question moves accuracy by 0.0625.
    for metrics in (one, two):
        assert metrics["status"] == "finished"
        assert metrics["val_accuracy"] >= 0.5
    assert abs(one["val_accuracy"] - two["val_accuracy"]) <= 0.25
    assert abs(one["test_accuracy"] - two["test_accuracy"]) <= 0.25
    # The two processes split each epoch's batches between them: half the optimizer steps per epoch.
    steps = {name: len((tmp_path / name / "train_log.csv").read_text().splitlines()) - 1 for name in ("one", "two")}
    assert steps["two"] / two["epochs_run"] == pytest.approx(steps["one"] / one["epochs_run"] / 2, abs=1)
    # Evaluation was split between the processes and gathered: every question, in the split's order.
    for split in ("val", "test"):
        lines = (tmp_path / "two" / f"predictions_{split}.jsonl").read_text().splitlines()
        assert [json.loads(line)["question_id"] for line in lines] == [f"{split}-{i}" for i in range(16)]


# ---------------------------------------------------------------- evaluation split across processes

# Every process evaluates its share (evaluate(..., accelerator=...)) twice: once filling its vision cache,
# once reading it. Rank 0 then evaluates everything alone, as a single process does. Each rank writes
# what it saw.
EVAL_DRIVER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from accelerate import Accelerator
    from instructblip_peft.config import resolve_settings
    from instructblip_peft.evaluate import VisionCache, evaluate
    from instructblip_peft.model import load_model, load_preset

    records_file, out = Path(sys.argv[1]), Path(sys.argv[2])
    records, root = json.loads(records_file.read_text()), records_file.parent
    acc = Accelerator(cpu=True)
    result = {}
    for family in ("t5", "llama"):
        preset = load_preset(f"tiny-{family}")
        model, processor = load_model(preset, seed=1)
        for p in model.parameters():  # the ViT is frozen in every experiment (else no vision cache)
            p.requires_grad_(False)
        settings = resolve_settings(preset=preset, overrides={"eval_batch_size": 2})
        cache = VisionCache()
        run = lambda **kw: evaluate(model, processor, records, root, "scienceqa", settings, family,
                                    progress=False, **kw)
        filling = run(vision_cache=cache, accelerator=acc)
        cached = run(vision_cache=cache, accelerator=acc)
        result[family] = {"filling": filling.predictions, "cached": cached.predictions,
                          "accuracy": [filling.accuracy, cached.accuracy], "cache_size": len(cache),
                          "cached_images": [r["image"] for r in records
                                            if VisionCache.key(root, r["image"], settings.image_size) in cache]}
        if acc.is_main_process:
            single = run()
            result[family].update(single=single.predictions, single_accuracy=single.accuracy)
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(result))
    acc.wait_for_everyone()
""")


def eval_records(root, n: int = 9) -> list[dict]:
    """Prompts of different lengths (so batches differ in width), 2-4 choices, one image per question."""
    rng = random.Random(0)
    words = "red blue circle square which shape color left right big small the of".split()
    records = []
    for i in range(n):
        k = 2 + i % 3
        image = f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / image)
        records.append({"question_id": f"q{i}", "image": image,
                        "question": " ".join(rng.choice(words) for _ in range(2 + 3 * (i * 5 % n))) + "?",
                        "choices": [" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(k)],
                        "answer_index": i % k, "answer": "", "context": "", "meta": {}})
    return records


def test_evaluation_split_across_two_processes_equals_one_process(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    records = eval_records(data)
    (data / "records.json").write_text(json.dumps(records))
    driver = tmp_path / "eval_driver.py"
    driver.write_text(EVAL_DRIVER)
    out = tmp_path / "out"
    out.mkdir()
    launch(driver, 2, [str(data / "records.json"), str(out)])
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for family in ("t5", "llama"):
        zero, one = ranks[0][family], ranks[1][family]
        single = zero["single"]
        assert [p["question_id"] for p in single] == [r["question_id"] for r in records]
        # Each process ran some of the batches a single process runs: the same predictions, scores bit for bit,
        # in the records' order, on both ranks, whether the images came from the cache or not.
        for rank in (zero, one):
            assert rank["filling"] == single and rank["cached"] == single
            assert rank["accuracy"] == [zero["single_accuracy"]] * 2
        # Each process encoded and cached only its own share of the images: together all of them, once.
        assert zero["cached_images"] and one["cached_images"]
        assert sorted(zero["cached_images"] + one["cached_images"]) == sorted(r["image"] for r in records)
        assert zero["cache_size"] + one["cache_size"] == len(records)
