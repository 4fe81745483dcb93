"""Evaluation: the paper's ranking metric, batched; free-form generation as an option; breakdowns.

Ranking (the paper, after LAVIS `predict_class`): every candidate "(a) c1", "(b) c2", ... is scored by the
LLM's summed token cross-entropy given image + prompt; the lowest wins. As in the original, T5 candidates
end in </s> and LLaMA candidates do not (`llama_candidate_eos`), and the LLM reads the whole prompt while
the Q-Former's copy is cut to max_txt_len (`eval_max_txt_len`).

Speed: the vision encoder, the Q-Former and the prompt side of the LLM run once per question and are shared
by its candidates — the T5 encoder output is repeated over the candidates; for LLaMA the prompt's KV cache
is computed once (left-padded, explicit position ids) and selected per candidate, so only the candidate
tokens run a second time. `score_naive` is the original method (one full forward per candidate, batch 1)
and the reference the batched scores must match.

Tokenisation is `data.batches`' (the training collator's), so a score means the same in both places.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from .data.batches import (IGNORE_INDEX, encode_prompts, encode_targets, image_key, load_image, make_transform,
                           mask, pad, pad_id)
from .data.prompts import LETTERS, candidate_texts, render_prompt
from .data.scienceqa import CATEGORIES as SCIENCEQA_CATEGORIES
from .data.scienceqa import SUBJECT_CATEGORIES
from .errors import UserError
from .lora import base_model



@dataclass
class EvalResult:
    accuracy: float
    predictions: list[dict]
    breakdown: dict
    wall_time_s: float = 0.0
    questions_per_s: float = 0.0
    mode: str = "rank"
    extra: dict = field(default_factory=dict)

    def __iter__(self):  # `accuracy, predictions, breakdown = evaluate(...)` also works
        return iter((self.accuracy, self.predictions, self.breakdown))


# ---------------------------------------------------------------- vision cache

class _Spill:
    """Tensors appended to one memory-mapped file, read back by offset. Space is reserved on disk before it is
    written (a full disk is an error here, not a crash later); the file grows by doubling, up to 1 GiB at a
    time. Pages are released from the process after each write and read (MADV_DONTNEED: their contents stay
    in the file and the page cache), so the spill adds to the kernel's evictable cache, not to the process's
    resident memory."""

    MIN_BYTES = 64 * 2**20
    MAX_GROWTH = 2**30

    def __init__(self, path: Path | None, setting: str = "eval_vision_cache"):
        self.setting = setting  # the cache's on/off setting, for the error message
        self.given = path is not None
        self.path = path
        self.map: np.memmap | None = None
        self.used = 0

    def _fail(self, e: OSError):
        which = "training" if self.setting.startswith("train") else "evaluation"
        raise UserError(f"{self.path}: cannot write the {which} vision cache ({e.strerror or e}); free disk space, "
                        f"raise {self.setting}_ram_gb or set {self.setting} false") from None

    def _reserve(self, end: int) -> None:
        capacity = 0 if self.map is None else len(self.map)
        if end <= capacity:
            return
        new = max(end, min(2 * capacity, capacity + self.MAX_GROWTH), self.MIN_BYTES)
        try:
            if self.path is None:
                fd, name = tempfile.mkstemp(prefix="instructblip-peft-vision-cache-", suffix=".bin")
                os.close(fd)
                self.path = Path(name)
            elif self.map is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.unlink(missing_ok=True)  # a killed run's spill holds nothing this one knows of
            if self.map is not None:
                self.map.flush()
                self.map = None
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, new)
            finally:
                os.close(fd)
            self.map = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(new,))
        except OSError as e:
            self._fail(e)

    def _release(self, offset: int, size: int) -> None:
        """Drop the pages of [offset, offset + size) from this process (not from the file)."""
        raw = getattr(self.map, "_mmap", None)
        if raw is None or not hasattr(raw, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset - offset % mmap.PAGESIZE
        end = min(len(self.map), offset + size + (-(offset + size)) % mmap.PAGESIZE)
        raw.madvise(mmap.MADV_DONTNEED, start, end - start)

    def write(self, t: torch.Tensor) -> tuple[int, int]:
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        offset = self.used
        self._reserve(offset + data.size)
        self.map[offset: offset + data.size] = data
        self._release(offset, data.size)
        self.used += data.size
        return offset, data.size

    def read(self, offset: int, size: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        data = np.array(self.map[offset: offset + size])
        self._release(offset, size)
        return torch.from_numpy(data).view(dtype).reshape(shape)

    def close(self) -> None:
        self.map = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        if not self.given:
            self.path = None
        self.used = 0


class VisionCache:
    """Vision-encoder outputs per image, reused by every evaluation of a run (and, with `train_vision_cache`,
    by every training epoch after the first: vision_reuse.py).

    The ViT is frozen in every experiment and evaluation does not augment, so an image's encoder output
    never changes. What is stored is the encoder's last hidden state BEFORE `post_layernorm`: that layer
    norm trains in every experiment, so it (and the Q-Former) run live on the cached tensor.
    Keyed by image path and size (all text-only questions share one blank image). Stored as evaluation uses
    it, in the model's dtype (ViT-g in bf16: 257 x 1408 x 2 bytes = 0.7 MB per image), on `device` ('cpu'
    keeps GPU memory free) up to `max_ram_bytes` (None: no limit); beyond that in a memory-mapped file,
    `spill_path` (None: a temporary file), read back bit for bit. `close()` deletes the file. `setting`: the
    setting that switches this cache (named in errors).
    """

    def __init__(self, device: str | torch.device = "cpu", max_ram_bytes: int | None = None,
                 spill_path: str | os.PathLike | None = None, setting: str = "eval_vision_cache"):
        self.device = torch.device(device)
        self.max_ram_bytes = max_ram_bytes
        self._store: dict[str, torch.Tensor] = {}
        self._spilled: dict[str, tuple[int, int, torch.dtype, torch.Size]] = {}
        self._spill = _Spill(Path(spill_path) if spill_path is not None else None, setting)
        self.ram_bytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def key(image_root, relative: str | None, image_size: int) -> str:
        return image_key(image_root, relative, image_size)

    @property
    def spill_path(self) -> Path | None:
        return self._spill.path

    def __len__(self) -> int:
        return len(self._store) + len(self._spilled)

    def __contains__(self, key: str) -> bool:
        return key in self._store or key in self._spilled

    def get(self, key: str) -> torch.Tensor:
        self.hits += 1
        if key in self._store:
            return self._store[key]
        offset, size, dtype, shape = self._spilled[key]
        return self._spill.read(offset, size, dtype, shape).to(self.device)

    def put(self, key: str, hidden: torch.Tensor) -> None:
        self.misses += 1
        hidden = hidden.detach()
        size = hidden.numel() * hidden.element_size()
        if self.max_ram_bytes is None or self.ram_bytes + size <= self.max_ram_bytes:
            self._store[key] = hidden.to(self.device)
            self.ram_bytes += size
        else:
            offset, size = self._spill.write(hidden.to("cpu"))
            self._spilled[key] = (offset, size, hidden.dtype, hidden.shape)

    def nbytes(self) -> int:
        return self.ram_bytes + self.spilled_bytes

    @property
    def spilled_bytes(self) -> int:
        return sum(size for _, size, _, _ in self._spilled.values())

    def stats(self) -> dict:
        """What the cache holds: images, bytes in RAM and in the spill file (for metrics.json)."""
        n = len(self)
        return {"images": n, "ram_bytes": self.ram_bytes, "spilled_bytes": self.spilled_bytes,
                "bytes_per_image": self.nbytes() / n if n else None}

    def clear(self) -> None:
        self._store.clear()
        self._spilled.clear()
        self.ram_bytes = 0
        self._spill.close()

    close = clear


def vision_cache_for(settings, spill_path: str | os.PathLike | None = None, kind: str = "eval") -> VisionCache | None:
    """The cache a run should create once and pass to each of its evaluations (kind 'eval'), or to its training
    (kind 'train'); None when switched off: `<kind>_vision_cache_ram_gb` of RAM, then `spill_path` (a run
    directory's RunDir.vision_cache_file)."""
    setting = f"{kind}_vision_cache"
    if not settings.get(setting):
        return None
    ram_gb = settings.get(f"{setting}_ram_gb")
    return VisionCache(max_ram_bytes=None if ram_gb is None else int(ram_gb * 2**30), spill_path=spill_path,
                       setting=setting)


def vision_encoder_frozen(base) -> bool:
    vm = base.vision_model
    return not any(p.requires_grad for m in (vm.embeddings, vm.encoder) for p in m.parameters())


# ---------------------------------------------------------------- model parts

def unwrap(model):
    """The plain module under accelerate/DDP/torch.compile wrappers (a PeftModel stays a PeftModel)."""
    from accelerate.utils import extract_model_from_parallel
    return extract_model_from_parallel(model)


def _model_device_dtype(base) -> tuple[torch.device, torch.dtype]:
    w = base.vision_model.embeddings.patch_embedding.weight
    return w.device, w.dtype


def autocast_for(model, settings=None):
    """The autocast evaluation runs under, whatever dtype mix the model is in: half-precision weights need
    autocast of their type (the trained tensors are fp32); an fp32 model follows the run's mixed_precision
    setting (so a run reloaded in its own dtypes computes as it did in training), and none on CPU under auto."""
    from .model import AUTOCAST_DTYPES, resolve_precision

    base = base_model(unwrap(model))
    device, _ = _model_device_dtype(base)
    dtypes = {p.dtype for p in base.parameters() if p.is_floating_point()}
    half = next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), None)
    if half is None and settings is not None and settings.get("mixed_precision") not in (None, "no"):
        half = AUTOCAST_DTYPES.get(resolve_precision(settings["mixed_precision"], "auto", device).mixed_precision)
    if half is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=half)


def vit_hidden(base, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision encoder's last hidden state before post_layernorm: the frozen, cacheable part."""
    vm = base.vision_model
    return vm.encoder(inputs_embeds=vm.embeddings(pixel_values)).last_hidden_state


def query_features(base, vit_out: torch.Tensor, qformer_input_ids: torch.Tensor,
                   qformer_attention_mask: torch.Tensor) -> torch.Tensor:
    """post_layernorm -> Q-Former (queries + instruction) -> projection: [B, num_query_tokens, d_llm].
    The same steps as InstructBlipForConditionalGeneration.get_image_features, from the ViT output on."""
    image_embeds = base.vision_model.post_layernorm(vit_out)
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    queries = base.query_tokens.expand(image_embeds.shape[0], -1, -1)
    query_mask = torch.ones(queries.shape[:-1], dtype=torch.long, device=image_embeds.device)
    out = base.qformer(input_ids=qformer_input_ids, attention_mask=torch.cat([query_mask, qformer_attention_mask], 1),
                       query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                       return_dict=True)
    return base.language_projection(out.last_hidden_state[:, : queries.shape[1], :])


def _llm_inputs_embeds(base, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    embeds = base.get_input_embeddings()(input_ids)
    placeholders = (input_ids == base.config.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(placeholders, features.to(embeds.dtype))


def _summed_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row sum of token cross-entropies; IGNORE_INDEX labels count nothing."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return ce.sum(-1)


# ---------------------------------------------------------------- batch preparation

@dataclass
class _Batch:
    records: list[dict]
    prompts: list[str]
    qformer_ids: list[list[int]]
    llm_ids: list[list[int]]


# Settings added after runs were recorded: a run.json without them evaluates as the code did then.
_UNRECORDED = {"clean_prompt": False, "llama_candidate_eos": True}


def _setting(settings, key: str):
    if key in settings:
        return settings[key]
    return settings["max_txt_len"] if key == "eval_max_txt_len" else _UNRECORDED[key]


def _encode(records, processor, dataset, settings) -> _Batch:
    prompts = [render_prompt(r, dataset, _setting(settings, "clean_prompt")) for r in records]
    enc = encode_prompts(processor, prompts, settings.max_txt_len, _setting(settings, "eval_max_txt_len"))
    return _Batch(list(records), prompts, enc["qformer_input_ids"], enc["input_ids"])


def _candidate_ids(processor, texts, family, settings) -> list[list[int]]:
    return encode_targets(processor, texts, family, settings.max_output_txt_len,
                          llama_eos=_setting(settings, "llama_candidate_eos"))


def _pixel_values(records, image_root, transform) -> torch.Tensor:
    return torch.stack([transform(load_image(image_root, r.get("image"), transform.image_size)) for r in records])


def _vit_outputs(base, records, image_root, transform, cache: VisionCache | None) -> torch.Tensor:
    device, dtype = _model_device_dtype(base)
    if cache is None:
        return vit_hidden(base, _pixel_values(records, image_root, transform).to(device, dtype)).to(dtype)
    keys = [VisionCache.key(image_root, r.get("image"), transform.image_size) for r in records]
    todo = {}
    for k, r in zip(keys, records):
        if k not in cache and k not in todo:
            todo[k] = r
    if todo:
        hidden = vit_hidden(base, _pixel_values(list(todo.values()), image_root, transform).to(device, dtype))
        for k, h in zip(todo, hidden.to(dtype)):
            cache.put(k, h)
    return torch.stack([cache.get(k) for k in keys]).to(device, dtype)


def _features(base, batch: _Batch, processor, image_root, transform, cache) -> torch.Tensor:
    device, _ = _model_device_dtype(base)
    vit_out = _vit_outputs(base, batch.records, image_root, transform, cache)
    qpad = processor.qformer_tokenizer.pad_token_id
    return query_features(base, vit_out, pad(batch.qformer_ids, qpad).to(device), mask(batch.qformer_ids).to(device))


# ---------------------------------------------------------------- batched ranking

def _score_batch(base, batch: _Batch, processor, family, settings, features) -> list[list[float]]:
    device, _ = _model_device_dtype(base)
    tok = processor.tokenizer
    owner, cands = [], []
    for i, r in enumerate(batch.records):
        texts = candidate_texts(r)
        owner += [i] * len(texts)
        cands += texts
    targets = _candidate_ids(processor, cands, family, settings)
    owner_t = torch.tensor(owner, device=device)
    lm = base.language_model
    if family == "t5":
        ids = pad(batch.llm_ids, pad_id(tok)).to(device)
        attn = mask(batch.llm_ids).to(device)
        embeds = _llm_inputs_embeds(base, ids, features)
        enc = lm.get_encoder()(inputs_embeds=embeds, attention_mask=attn, return_dict=True).last_hidden_state
        labels = pad(targets, IGNORE_INDEX).to(device)
        out = lm(encoder_outputs=BaseModelOutput(last_hidden_state=enc[owner_t]), attention_mask=attn[owner_t],
                 decoder_input_ids=lm.prepare_decoder_input_ids_from_labels(labels=labels), use_cache=False)
        scores = _summed_ce(out.logits, labels)
    else:
        # Left padding keeps every prompt's last token in the last column; position ids from the mask make
        # a padded prompt see exactly the positions it would alone.
        ids = pad(batch.llm_ids, pad_id(tok), side="left").to(device)
        attn = mask(batch.llm_ids, side="left").to(device)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        embeds = _llm_inputs_embeds(base, ids, features)
        out = lm(inputs_embeds=embeds, attention_mask=attn, position_ids=positions, use_cache=True,
                 logits_to_keep=1)
        cache = out.cache
        cache.batch_select_indices(owner_t)  # one copy of its prompt's keys/values per candidate
        cand_ids = pad(targets, pad_id(tok)).to(device)
        cand_attn = mask(targets).to(device)
        lengths = attn.sum(-1)[owner_t]
        cand_pos = lengths[:, None] + torch.arange(cand_ids.shape[1], device=device)[None]
        out2 = lm(input_ids=cand_ids, attention_mask=torch.cat([attn[owner_t], cand_attn], 1),
                  position_ids=cand_pos, cache=cache, use_cache=False)
        # The first candidate token is predicted by the prompt's last position, the others by the
        # candidate pass.
        logits = torch.cat([out.logits[owner_t][:, -1:], out2.logits[:, :-1]], 1)
        labels = cand_ids.masked_fill(cand_attn == 0, IGNORE_INDEX)
        scores = _summed_ce(logits, labels)
    scores = scores.tolist()
    per_question = [[] for _ in batch.records]
    for i, s in zip(owner, scores):
        per_question[i].append(s)
    return per_question


# ---------------------------------------------------------------- naive reference

def score_naive(model, processor, records, image_root, dataset, settings, family) -> list[list[float]]:
    """The original method: one full model forward per (question, candidate), batch 1, no reuse."""
    model = unwrap(model)
    base = base_model(model)
    device, dtype = _model_device_dtype(base)
    transform = make_transform(processor, settings, train=False)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast_for(model, settings):
            out_scores = []
            for r in records:
                batch = _encode([r], processor, dataset, settings)
                pixel_values = _pixel_values([r], image_root, transform).to(device, dtype)
                qids = torch.tensor(batch.qformer_ids, device=device)
                prompt = batch.llm_ids[0]
                scores = []
                for target in _candidate_ids(processor, candidate_texts(r), family, settings):
                    if family == "t5":
                        ids = torch.tensor([prompt], device=device)
                        labels = torch.tensor([target], device=device)
                    else:
                        ids = torch.tensor([prompt + target], device=device)
                        labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + target], device=device)
                    out = base(pixel_values=pixel_values, qformer_input_ids=qids,
                               qformer_attention_mask=torch.ones_like(qids), input_ids=ids,
                               attention_mask=torch.ones_like(ids), labels=labels if family == "t5" else None)
                    logits = out.logits if family == "t5" else out.logits[:, :-1]
                    labels = labels if family == "t5" else labels[:, 1:]
                    scores.append(_summed_ce(logits, labels).item())
                out_scores.append(scores)
            return out_scores
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- generation

def parse_choice(text: str, choices: list[str]) -> int | None:
    """A free-form answer -> choice index: "(b) text", "(b)", "b", "b)", or the choice's text; else None."""
    t = " ".join(text.strip().lower().split())
    normal = [" ".join(c.strip().lower().split()) for c in choices]
    n = len(choices)

    def letter(ch: str) -> int | None:
        i = LETTERS.find(ch)
        return i if 0 <= i < n else None

    for i, c in enumerate(normal):  # the exact target form "(b) text"
        if t.rstrip(".") == f"({LETTERS[i]}) {c}".rstrip("."):
            return i
    m = re.match(r"^\(?([a-e])\)(?=$|[\s.:,])", t) or re.fullmatch(r"([a-e])[.:]?", t)
    if m:
        return letter(m.group(1))
    stripped = t.rstrip(".").strip()
    if stripped in normal:
        return normal.index(stripped)
    m = re.search(r"\(([a-e])\)", t)  # "the answer is (c)"
    return letter(m.group(1)) if m else None


def _generate_batch(base, batch: _Batch, processor, family, settings, features) -> list[str]:
    device, _ = _model_device_dtype(base)
    tok = processor.tokenizer
    side = "right" if family == "t5" else "left"  # decoder-only generation continues from the last column
    ids = pad(batch.llm_ids, pad_id(tok), side=side).to(device)
    attn = mask(batch.llm_ids, side=side).to(device)
    embeds = _llm_inputs_embeds(base, ids, features)
    out = base.language_model.generate(inputs_embeds=embeds, attention_mask=attn, do_sample=False, num_beams=1,
                                       max_new_tokens=settings.max_output_txt_len, pad_token_id=pad_id(tok),
                                       eos_token_id=tok.eos_token_id)
    return tok.batch_decode(out, skip_special_tokens=True)


# ---------------------------------------------------------------- evaluate

def evaluate(model, processor, records, image_root, dataset, settings, family, vision_cache: VisionCache | None = None,
             progress: bool = True, accelerator=None) -> EvalResult:
    """Accuracy, per-question predictions and the dataset's breakdown of `records`.

    settings: eval_mode ('rank' | 'generate'), eval_batch_size (questions per batch), max_eval_samples,
    max_txt_len (the Q-Former text), eval_max_txt_len (the LLM prompt), clean_prompt, llama_candidate_eos,
    max_output_txt_len, image_size, mixed_precision. `vision_cache`: a VisionCache kept across a run's
    evaluations (create it once; see vision_cache_for); ignored, with a warning, if the ViT trains.
    Any dtype mix works (bf16/fp16 base weights with fp32 trained tensors): evaluation applies autocast itself
    (autocast_for).
    `accelerator`: with several processes (`accelerate launch`), every process must call this with the
    same records; each evaluates its share of the batches (and caches only its share of the images), and
    every process gets all predictions back, in the records' order.
    """
    if family not in ("t5", "llama"):
        raise UserError(f"unknown LLM family '{family}' (expected 't5' or 'llama')")
    mode = settings.eval_mode
    if mode not in ("rank", "generate"):
        raise UserError(f"setting 'eval_mode' must be 'rank' or 'generate', got {mode!r}")
    records = list(records)
    if settings.get("max_eval_samples"):
        records = records[: settings.max_eval_samples]
    model = unwrap(model)
    base = base_model(model)
    if vision_cache is not None and not vision_encoder_frozen(base):
        warnings.warn("the vision encoder has trainable weights: evaluating without the vision cache", stacklevel=2)
        vision_cache = None
    transform = make_transform(processor, settings, train=False)
    start = time.perf_counter()
    encoded = _encode(records, processor, dataset, settings)
    # Similar lengths in a batch waste less padding; results are put back in the records' order.
    order = sorted(range(len(records)), key=lambda i: len(encoded.llm_ids[i]))
    size = settings.eval_batch_size
    batches = [order[lo: lo + size] for lo in range(0, len(order), size)]
    # Several processes: process k runs batches k, k + N, k + 2N, ... of that same length-sorted list, so
    # every batch is the one a single process would run (same padding, same scores) and the work is even.
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    batches = batches[rank::world]
    results: dict[int, list | str] = {}
    was_training = model.training
    model.eval()
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(map(len, batches)), desc=f"eval ({mode})", unit="q", disable=not progress,
                   leave=False)
        with torch.inference_mode(), autocast_for(model, settings):
            for idx in batches:
                batch = _Batch([records[i] for i in idx], [encoded.prompts[i] for i in idx],
                               [encoded.qformer_ids[i] for i in idx], [encoded.llm_ids[i] for i in idx])
                features = _features(base, batch, processor, image_root, transform, vision_cache)
                fn = _score_batch if mode == "rank" else _generate_batch
                for i, res in zip(idx, fn(base, batch, processor, family, settings, features)):
                    results[i] = res
                bar.update(len(idx))
        bar.close()
    finally:
        model.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object
        results = dict(gather_object(list(results.items())))
    predictions = []
    for i, r in enumerate(records):
        if mode == "rank":
            scores = results[i]
            predicted = min(range(len(scores)), key=scores.__getitem__)
            pred = {"scores": scores}
        else:
            parsed = parse_choice(results[i], r["choices"])
            predicted = -1 if parsed is None else parsed
            pred = {"scores": [], "generated": results[i]}
        predictions.append({"question_id": r["question_id"], "predicted": predicted, "answer": r["answer_index"],
                            "correct": predicted == r["answer_index"], **pred})
    wall = time.perf_counter() - start
    flags = [p["correct"] for p in predictions]
    accuracy = sum(flags) / len(flags) if flags else 0.0
    return EvalResult(accuracy, predictions, breakdown(records, flags, dataset), wall_time_s=wall,
                      questions_per_s=len(records) / wall if wall > 0 else 0.0, mode=mode)


# ---------------------------------------------------------------- breakdowns

def breakdown(records: list[dict], correct_flags: list[bool], dataset: str) -> dict:
    """Accuracy per category as the ScienceQA and IconQA papers report it. Empty categories are absent.

    ScienceQA: NAT/SOC/LAN (subject), TXT (has a hint), IMG (has an image), NO (neither), G1-6, G7-12,
    topic:<topic>. IconQA: skill:<s> (a question counts for each of its skills), grade:<g>. Custom: none.
    """
    if len(records) != len(correct_flags):
        raise ValueError(f"{len(records)} records but {len(correct_flags)} correctness flags")
    groups: dict[str, list[bool]] = {}

    def add(cat: str, ok: bool) -> None:
        groups.setdefault(cat, []).append(bool(ok))

    for r, ok in zip(records, correct_flags):
        meta = r.get("meta") or {}
        if dataset == "scienceqa":
            if meta.get("subject") in SUBJECT_CATEGORIES:
                add(SUBJECT_CATEGORIES[meta["subject"]], ok)
            if meta.get("has_hint"):
                add("TXT", ok)
            if meta.get("has_image"):
                add("IMG", ok)
            if not meta.get("has_hint") and not meta.get("has_image"):
                add("NO", ok)
            m = re.fullmatch(r"grade(\d+)", str(meta.get("grade", "")))
            if m:
                add("G1-6" if int(m.group(1)) <= 6 else "G7-12", ok)
            if meta.get("topic"):
                add(f"topic:{meta['topic']}", ok)
        elif dataset == "iconqa":
            for skill in meta.get("skills") or []:
                add(f"skill:{skill}", ok)
            if meta.get("grade"):
                add(f"grade:{meta['grade']}", ok)
    fixed = [k for k in SCIENCEQA_CATEGORIES if k in groups]
    rest = sorted(k for k in groups if k not in SCIENCEQA_CATEGORIES)
    return {k: sum(groups[k]) / len(groups[k]) for k in fixed + rest}
