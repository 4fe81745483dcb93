"""A real-size rehearsal on CPU: the full FlanT5-XL (or Vicuna-7B) InstructBLIP through the CLI, in bf16.

1. Build the architecture of params/architectures/ with random weights in bf16 and save it in the hub's
   layout: config.json (with image_token_index), sharded safetensors, generation config, processor_config.json
   and preprocessor_config.json, the LLM tokenizer and the BERT Q-Former tokenizer (qformer_tokenizer/).
   The real tokenizers cannot be downloaded here, so these have the real ones' special tokens at the real
   ids, the real vocabulary sizes, and <image> at the config's image_token_index.
2. Copy params/ with the preset's `source` pointed at that directory (INSTRUCTBLIP_PEFT_PARAMS).
3. Preprocess the bundled ScienceQA sample and run
   `instructblip-peft run scienceqa 28 -p mixed_precision bf16` (2 optimizer steps at batch 2, 4 evaluation
   questions per split) in a fresh work directory, watching the process tree's memory.
4. Print peak RSS, seconds per step, vision-cache bytes per image and checkpoint sizes; delete everything.

It needs about 1.3x the checkpoint in free RAM (FlanT5-XL: 8 GB of bf16 weights) and twice it on disk, and
takes 10-30 minutes on 2 CPU cores. It is not part of `make test`.

    python benchmarks/real_size_rehearsal.py                        # FlanT5-XL, experiment 28
    python benchmarks/real_size_rehearsal.py --preset vicuna7b      # experiment 60 (about 16 GB of weights)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

EXPERIMENT = {"flant5xl": "28", "vicuna7b": "60"}
GB = 1e9


# ---------------------------------------------------------------- tokenizers with the real ids

def _byte_bpe_pieces():
    """vocab and merges of a byte-level BPE trained on the tiny presets' word list (deterministic)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from instructblip_peft.model import _TINY_WORDS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=2048, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TINY_WORDS + [" " + w for w in _TINY_WORDS], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return sorted(model["vocab"], key=model["vocab"].get), merges


def llm_tokenizer(family: str, config):
    """T5: <pad> 0, </s> 1, <unk> 2, 32,000 pieces, <extra_id_0..99> at 32000-32099, <image> at 32100.
    LLaMA (Vicuna): <unk> 0, <s> 1, </s> 2, 32,000 pieces, [PAD] at 32000, <image> at 32001."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from instructblip_peft.model import IMAGE_TOKEN

    specials = ["<pad>", "</s>", "<unk>"] if family == "t5" else ["<unk>", "<s>", "</s>"]
    pieces, merges = _byte_bpe_pieces()
    vocab = {t: i for i, t in enumerate(specials)}
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    while len(vocab) < 32000:  # unused ids up to the real vocabulary size (no merge ever produces them)
        vocab[f"<unused_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if family == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
        fast.add_special_tokens({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)]})
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        fast.add_special_tokens({"pad_token": "[PAD]"})
    fast.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = fast.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != config.image_token_index:
        raise RuntimeError(f"{IMAGE_TOKEN} got id {image_id}, the config says {config.image_token_index}")
    return fast


def qformer_tokenizer(config):
    """bert-base-uncased's layout: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, 30,522 entries, then
    InstructBLIP's [DEC] (bos) at 30522: 30,523 = the Q-Former's vocab_size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    from instructblip_peft.model import _TINY_WORDS

    ids = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = chars + ["##" + c for c in chars] + _TINY_WORDS
    vocab = dict(ids)
    free = (i for i in range(30522) if i not in ids.values())
    for w in dict.fromkeys(words):
        vocab[w] = next(free)
    for i in free:
        vocab[f"[unused{i}]"] = i
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 101), ("[SEP]", 102)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.add_special_tokens({"bos_token": "[DEC]"})
    if len(fast) != config.qformer_config.vocab_size:
        raise RuntimeError(f"Q-Former tokenizer has {len(fast)} entries, the config {config.qformer_config.vocab_size}")
    return fast


# ---------------------------------------------------------------- step 1: build and save (its own process)

def build_and_save(preset_name: str, out: Path) -> dict:
    import torch
    from transformers import BlipImageProcessorPil, InstructBlipForConditionalGeneration, InstructBlipProcessor

    from instructblip_peft.model import IMAGE_TOKEN, architecture_config, load_preset

    preset = load_preset(preset_name)
    config = architecture_config(preset)
    family = preset["family"]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, config.qformer_config.initializer_range)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    model.save_pretrained(out, max_shard_size="5GB")
    save_s = time.perf_counter() - t0
    del model
    tok = llm_tokenizer(family, config)
    tok.image_token = IMAGE_TOKEN
    image_processor = BlipImageProcessorPil(size={"height": 224, "width": 224}, resample=3,  # bicubic
                                            image_mean=[0.48145466, 0.4578275, 0.40821073],
                                            image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = InstructBlipProcessor(image_processor=image_processor, tokenizer=tok,
                                      qformer_tokenizer=qformer_tokenizer(config),
                                      num_query_tokens=config.num_query_tokens)
    processor.save_pretrained(out)
    image_processor.save_pretrained(out)  # preprocessor_config.json, as on the hub
    return {"params": params, "build_s": build_s, "save_s": save_s,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "files": sorted(p.name for p in out.iterdir())}


# ---------------------------------------------------------------- step 3: the CLI run, watched

class TreeWatcher:
    """Peak memory of a process and its descendants (the CLI, papermill, the notebook kernel)."""

    def __init__(self, pid: int, every_s: float = 0.25):
        import psutil

        self.root = psutil.Process(pid)
        self.every_s = every_s
        self.peak_sum = self.peak_one = self.peak_one_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    m = p.memory_info()
                except psutil.Error:
                    continue
                total += m.rss
                self.peak_one = max(self.peak_one, m.rss)
                self.peak_one_anon = max(self.peak_one_anon, m.rss - getattr(m, "shared", 0))
            self.peak_sum = max(self.peak_sum, total)
            time.sleep(self.every_s)

    def stop(self):
        self._stop.set()
        self._thread.join()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(EXPERIMENT), default="flant5xl")
    ap.add_argument("--work-dir", type=Path, default=None, help="default: a new temporary directory")
    ap.add_argument("--keep", action="store_true", help="keep the saved model and the run")
    ap.add_argument("--ignore-free-memory", action="store_true", help="run even if free RAM looks too small")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child-build", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_build:
        print(json.dumps(build_and_save(args.child_build[0], Path(args.child_build[1]))))
        return {}

    import psutil

    from instructblip_peft.accounting import count_parameters
    from instructblip_peft.config import params_dir
    from instructblip_peft.model import load_preset, meta_model

    preset = load_preset(args.preset)
    weights = count_parameters(meta_model(preset))["total_params"] * 2  # bf16
    need_ram, available = 1.3 * weights + 3 * GB, psutil.virtual_memory().available
    print(f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / GB:.1f} GB RAM "
          f"({available / GB:.1f} GB available); {args.preset}: {weights / GB:.1f} GB of bf16 weights; "
          f"this needs about {need_ram / GB:.0f} GB free")
    if available < need_ram and not args.ignore_free_memory:
        print(f"not run: {args.preset} does not fit in the free RAM ({available / GB:.1f} GB < "
              f"{need_ram / GB:.0f} GB); --ignore-free-memory to try anyway")
        return {"preset": args.preset, "skipped": "free RAM", "available_bytes": available, "need_bytes": need_ram}

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ipeft-rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(work).free
    if free_disk < 2.2 * weights:
        raise SystemExit(f"{work}: {free_disk / GB:.0f} GB free on disk, need {2.2 * weights / GB:.0f} GB")
    model_dir, params, outputs = work / "model", work / "params", work / "outputs"
    env = {**os.environ, "INSTRUCTBLIP_PEFT_WORKDIR": str(work), "INSTRUCTBLIP_PEFT_PARAMS": str(params),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = {"preset": args.preset, "experiment": EXPERIMENT[args.preset], "weights_bytes": weights}
    try:
        # 1. the checkpoint, built and saved in a process of its own (its memory is returned when it ends)
        print(f"building and saving {args.preset} with random bf16 weights into {model_dir} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child-build", args.preset, str(model_dir)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"building failed:\n{proc.stderr[-4000:]}")
        result["build"] = json.loads(proc.stdout.strip().splitlines()[-1])
        result["checkpoint_bytes"] = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        print(f"  {result['build']['params'] / 1e9:.2f} B params, built in {result['build']['build_s']:.0f} s, "
              f"saved in {result['build']['save_s']:.0f} s ({result['checkpoint_bytes'] / GB:.2f} GB of safetensors; "
              f"peak RSS {result['build']['peak_rss_bytes'] / GB:.1f} GB): {', '.join(result['build']['files'])}",
              flush=True)

        # 2. params/ with the preset pointing at it
        import yaml
        shutil.copytree(params_dir(), params)
        presets = yaml.safe_load((params / "presets.yaml").read_text())
        presets[args.preset]["source"] = str(model_dir)
        (params / "presets.yaml").write_text(yaml.safe_dump(presets, sort_keys=False))

        # 3. the sample, then the run through the CLI
        cli = [sys.executable, "-m", "instructblip_peft"]
        subprocess.run(cli + ["preprocess", "scienceqa"], env=env, check=True, capture_output=True, text=True)
        command = cli + ["run", "scienceqa", EXPERIMENT[args.preset], "--outputs", str(outputs),
                         "-p", "mixed_precision", "bf16", "-p", "batch_size", "2", "-p", "max_steps", "2",
                         "-p", "max_train_samples", "4", "-p", "max_eval_samples", "4", "-p", "eval_batch_size", "4",
                         "-p", "log_every_steps", "1", "-p", "checkpoint_every_steps", "1"]
        print("running:", "instructblip-peft", " ".join(command[3:]), flush=True)
        t0 = time.perf_counter()
        run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watcher = TreeWatcher(run.pid)
        output = run.communicate()[0]
        watcher.stop()
        wall = time.perf_counter() - t0
        if run.returncode != 0:
            raise SystemExit(f"the run failed (exit {run.returncode}):\n{output[-4000:]}")
        run_dir = outputs / "scienceqa" / EXPERIMENT[args.preset]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        info = json.loads((run_dir / "run.json").read_text())
        cache = metrics.get("eval_vision_cache") or {}
        result.update({
            "cli_wall_s": wall, "precision": info.get("precision"),
            "peak_rss_tree_bytes": watcher.peak_sum, "peak_rss_one_process_bytes": watcher.peak_one,
            "peak_anon_one_process_bytes": watcher.peak_one_anon,
            "kernel_peak_rss_bytes": metrics["peak_memory_mb"] * 2**20,
            "steps": metrics["global_steps"], "batch_size": 2,
            "seconds_per_step": 2 / metrics["train_samples_per_s"] if metrics.get("train_samples_per_s") else None,
            "eval_questions_per_s": metrics.get("eval_questions_per_s"),
            "vision_cache": cache, "run_checkpoint_bytes": dir_bytes(run_dir / "checkpoint"),
            "adapter_and_tensors_bytes": dir_bytes(run_dir / "adapter")
            + (run_dir / "trained_tensors.safetensors").stat().st_size,
            "trainable_params": metrics["trainable_params"], "val_accuracy": metrics["val_accuracy"],
            "test_accuracy": metrics["test_accuracy"],
        })
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    r = result
    print(f"\n== rehearsal: {args.preset}, experiment {r['experiment']}, {r['precision']}, "
          f"CLI wall {r['cli_wall_s']:.0f} s")
    print(f"peak RSS: notebook kernel {r['kernel_peak_rss_bytes'] / GB:.2f} GB (of which anonymous at most "
          f"{r['peak_anon_one_process_bytes'] / GB:.2f} GB), whole process tree "
          f"{r['peak_rss_tree_bytes'] / GB:.2f} GB; "
          f"checkpoint on disk {r['checkpoint_bytes'] / GB:.2f} GB "
          f"(kernel peak {r['kernel_peak_rss_bytes'] / r['checkpoint_bytes']:.2f}x it)")
    print(f"training: {r['steps']} steps at batch 2, {r['seconds_per_step']:.1f} s per step; evaluation "
          f"{r['eval_questions_per_s']:.3f} questions/s")
    print(f"vision cache: {r['vision_cache'].get('images')} images, "
          f"{r['vision_cache'].get('bytes_per_image'):,.0f} bytes "
          f"per image; run checkpoint (resume state) {r['run_checkpoint_bytes'] / 2**20:.1f} MiB, adapter + trained "
          f"tensors {r['adapter_and_tensors_bytes'] / 2**20:.1f} MiB; {r['trainable_params']:,} trainable params")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
