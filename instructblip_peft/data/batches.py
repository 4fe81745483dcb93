"""From processed records to model batches: images, prompt encoding for both LLM families, collators.

The layout follows the original (LAVIS blip2_t5_instruct / blip2_vicuna_instruct):
- Q-Former text input: the rendered prompt.
- LLM input: `num_query_tokens` image placeholders (replaced by the Q-Former output inside the model) then
  the prompt tokens. Both texts are truncated from the LEFT to max_txt_len so the question's end survives;
  at evaluation the original cut only the Q-Former text, and the LLM prompt to `eval_max_txt_len` (null: not
  at all).
- T5: labels = target tokens (+ </s>); the decoder input is derived from them by the model.
- LLaMA: prompt + target + </s> in one sequence, right-padded; labels are -100 on placeholders, prompt, pad.
  Ranked candidates have no </s> (as in the original) unless `llama_candidate_eos`.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..model import IMAGE_TOKEN
from .prompts import candidate_texts, render_prompt, target_text

IGNORE_INDEX = -100
BLANK_IMAGE_COLOR = (255, 255, 255)  # text-only problems (ScienceQA without image) see a white image


# ---------------------------------------------------------------- images

def load_image(image_root: Path | None, relative: str | None, size: int) -> Image.Image:
    if relative is None:
        return Image.new("RGB", (size, size), BLANK_IMAGE_COLOR)
    path = Path(image_root) / relative
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read image ({e})") from None


def image_key(image_root: Path | None, relative: str | None, size: int) -> str:
    """What an image is to the vision caches: its path (all text-only questions share one blank image) and the
    size it is resized to."""
    where = "<blank>" if relative is None else str(Path(image_root or ".") / relative)
    return f"{where}@{size}"


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale=(0.5, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """The crop box of torchvision's RandomResizedCrop (area share in `scale`, log-uniform aspect ratio,
    10 tries, then a centre crop), drawn from `rng` so a resumed run draws the same crops."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


@dataclass
class ImageTransform:
    """Train: random resized crop (bicubic) + optional horizontal flip; eval: plain bicubic resize.
    Normalisation is the checkpoint's image processor's."""
    image_processor: object
    image_size: int
    train: bool = False
    augment: bool = True
    horizontal_flip: bool = True
    crop_scale_min: float = 0.5

    @property
    def deterministic(self) -> bool:
        """Whether an image always gives the same pixels (no random crop or flip): then its ViT output can be
        cached."""
        return not (self.train and self.augment)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if not self.deterministic:
            rng = rng or random.Random()
            box = random_resized_crop_box(image.width, image.height, rng, scale=(self.crop_scale_min, 1.0))
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC, box=box)
            # Flip is the original recipe; it is wrong for left/right questions (switch it off for those).
            if self.horizontal_flip and rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        out = self.image_processor(images=image, size={"height": self.image_size, "width": self.image_size},
                                   return_tensors="pt")
        return out["pixel_values"][0]


def make_transform(processor, settings, train: bool) -> ImageTransform:
    return ImageTransform(processor.image_processor, settings.image_size, train=train, augment=settings.augment,
                          horizontal_flip=settings.horizontal_flip, crop_scale_min=settings.crop_scale_min)


# ---------------------------------------------------------------- text

def image_token_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def encode_prompts(processor, prompts: list[str], max_txt_len: int, llm_max_txt_len: int | None = ...) -> dict:
    """Token ids (unpadded lists) of each prompt for the Q-Former and the LLM (placeholders first).

    Both are cut from the left: the Q-Former text to `max_txt_len`, the LLM prompt to `llm_max_txt_len`
    (left out: the same; None: not cut, as the original's evaluation)."""
    if llm_max_txt_len is ...:
        llm_max_txt_len = max_txt_len
    qtok, tok = processor.qformer_tokenizer, processor.tokenizer
    qtok.truncation_side = tok.truncation_side = "left"
    q_ids = qtok(prompts, truncation=True, max_length=max_txt_len)["input_ids"]
    cut = {} if llm_max_txt_len is None else {"truncation": True, "max_length": llm_max_txt_len}
    llm_ids = tok(prompts, **cut)["input_ids"]
    placeholders = [image_token_id(tok)] * processor.num_query_tokens
    return {"qformer_input_ids": q_ids, "input_ids": [placeholders + ids for ids in llm_ids]}


def encode_targets(processor, targets: list[str], family: str, max_output_txt_len: int,
                   llama_eos: bool = True) -> list[list[int]]:
    """Answer token ids, without the BOS a LLaMA tokenizer would put first. They end in EOS: for T5 always
    (its tokenizer adds it), for LLaMA when `llama_eos` (training targets; the original ranked candidates
    without it)."""
    tok = processor.tokenizer
    if family == "t5":
        tok.truncation_side = "right"
        return tok(targets, truncation=True, max_length=max_output_txt_len)["input_ids"]
    ids = tok(targets, add_special_tokens=False)["input_ids"]
    if not llama_eos:
        return [t[:max_output_txt_len] for t in ids]
    return [t[: max_output_txt_len - 1] + [tok.eos_token_id] for t in ids]


def pad(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [(s + [value] * (width - len(s))) if side == "right" else ([value] * (width - len(s)) + s) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def mask(seqs: list[list[int]], side: str = "right") -> torch.Tensor:
    return pad([[1] * len(s) for s in seqs], 0, side)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ---------------------------------------------------------------- dataset + collator

class QADataset(torch.utils.data.Dataset):
    """Processed records -> {pixel_values, prompt, target, ...}. Augmentation draws from a RNG seeded by
    (seed, epoch, index), so a resumed run sees exactly the crops an uninterrupted run would.
    `clean_prompt`: the `clean_prompt` setting (the original's prompt cleaning)."""

    def __init__(self, records: list[dict], image_root: Path | None, dataset: str, transform: ImageTransform,
                 seed: int = 0, clean_prompt: bool = True):
        self.records, self.image_root, self.dataset = records, image_root, dataset
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.clean_prompt = clean_prompt

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        rng = random.Random(f"{self.seed}-{self.epoch}-{i}")
        image = load_image(self.image_root, r.get("image"), self.transform.image_size)
        return {"question_id": r["question_id"], "pixel_values": self.transform(image, rng),
                "prompt": render_prompt(r, self.dataset, self.clean_prompt), "target": target_text(r),
                "candidates": candidate_texts(r), "answer_index": r["answer_index"],
                "image_key": image_key(self.image_root, r.get("image"), self.transform.image_size)}


@dataclass
class TrainCollator:
    """Dynamic padding per batch (to the longest sequence in it). `image_keys`: also pass each item's image_key
    (under "image_keys", for the training vision cache; it must be popped before the model sees the batch)."""
    processor: object
    family: str
    max_txt_len: int
    max_output_txt_len: int
    image_keys: bool = False

    def __call__(self, items: list[dict]) -> dict:
        tok = self.processor.tokenizer
        enc = encode_prompts(self.processor, [it["prompt"] for it in items], self.max_txt_len)
        targets = encode_targets(self.processor, [it["target"] for it in items], self.family,
                                 self.max_output_txt_len)
        batch = {
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "qformer_input_ids": pad(enc["qformer_input_ids"], self.processor.qformer_tokenizer.pad_token_id),
            "qformer_attention_mask": mask(enc["qformer_input_ids"]),
        }
        if self.family == "t5":
            batch["input_ids"] = pad(enc["input_ids"], pad_id(tok))
            batch["attention_mask"] = mask(enc["input_ids"])
            batch["labels"] = pad(targets, IGNORE_INDEX)
        else:
            seqs = [p + t for p, t in zip(enc["input_ids"], targets)]
            labels = [[IGNORE_INDEX] * len(p) + t for p, t in zip(enc["input_ids"], targets)]
            batch["input_ids"] = pad(seqs, pad_id(tok))
            batch["attention_mask"] = mask(seqs)
            batch["labels"] = pad(labels, IGNORE_INDEX)
        if self.image_keys:
            batch["image_keys"] = [it["image_key"] for it in items]
        return batch


# ---------------------------------------------------------------- data order

def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, lengths: list[int] | None = None,
                  group_by_length: bool = False, megabatch_factor: int = 50,
                  drop_last: bool = False) -> list[list[int]]:
    """The batches (lists of record indices) of one epoch: a permutation seeded by (seed, epoch), so any
    epoch's order can be rebuilt on resume and the consumed batches skipped.

    group_by_length: within megabatches of `megabatch_factor` batches, sort by length (longest first) so a
    batch pads little, then shuffle the batch order (the same trick as transformers' LengthGroupedSampler).
    drop_last: leave out the last, partial batch (the original's training loader), unless it is the only one.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_items).tolist()
    if group_by_length:
        if lengths is None or len(lengths) != num_items:
            raise ValueError("group_by_length needs one length per item")
        size = batch_size * megabatch_factor
        order = [i for start in range(0, num_items, size)
                 for i in sorted(order[start:start + size], key=lambda j: -lengths[j])]
    batches = [order[i:i + batch_size] for i in range(0, num_items, batch_size)]
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches

