"""Training reuses the frozen ViT: each training image's ViT output is kept from the first time it is seen,
and the ViT is skipped for a batch whose images are all kept (from the second epoch on, every batch).

Valid only when an image always gives the same ViT output: the training transform is deterministic
(`augment: false`), the ViT's weights are frozen and its dropout is 0 (so its forward draws nothing from the
RNG either: skipping it leaves the dropout masks of the Q-Former and the LLM where they were). `reuse_plan`
checks that and says why not otherwise.

What is kept is the encoder's last hidden state BEFORE `post_layernorm` (which trains), exactly as the ViT
produced it in training (same autocast, same dtype); the ViT's `forward` is replaced, on the model instance,
by one that applies post_layernorm to the kept tensors as InstructBlipVisionModel.forward does. A batch with
any image not kept yet runs the original forward on the whole batch, as without the cache, and keeps the new
images from the encoder's output. Storage is evaluate.VisionCache (RAM up to a cap, then a memory-mapped file
in the run directory); keys carry the model's identity (preset, source, seed, precision) besides the image's
path and size, and every training session starts with an empty cache, so a resumed run recomputes rather
than trusts what a killed one left.
"""
from __future__ import annotations

import contextlib
import hashlib
import json

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .evaluate import VisionCache, vision_encoder_frozen


def reuse_plan(base, transform, enabled: bool) -> str | None:
    """None when training may reuse ViT outputs; otherwise why not (a sentence for the run's output).
    `enabled`: the train_vision_cache setting (off: no reason to give)."""
    if not enabled:
        return None
    if not transform.deterministic:
        return ("train_vision_cache: training images are augmented (augment: true, random crops), so the ViT "
                "runs on every batch of every epoch; set augment false to reuse its outputs")
    if not vision_encoder_frozen(base):
        return "train_vision_cache: the ViT trains in this experiment, so it runs on every batch"
    if getattr(base.config.vision_config, "attention_dropout", 0.0):
        return ("train_vision_cache: the ViT has attention dropout (its output is random in training), so it "
                "runs on every batch")
    return None


def model_identity(**parts) -> str:
    """A short fingerprint of what determines the ViT's output besides the image (preset, weights source or
    seed, precision): the prefix of every key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TrainVisionCache:
    """Installed on a model's vision encoder for a training run; `batch(keys)` around each training forward
    says which images the batch holds (TrainCollator's image_keys). Outside `batch()` the ViT runs as usual.
    Counters: `vit_batches` (batches that ran the ViT), `reused_batches` (batches that skipped it)."""

    def __init__(self, base, cache: VisionCache, identity: str):
        self.vm = base.vision_model
        self.cache, self.identity = cache, identity
        self.keys: list[str] | None = None
        self.vit_batches = self.reused_batches = 0
        # The bound method or whatever wrapper already sits on the instance (accelerate's hooks do that).
        self._had_instance_forward = "forward" in vars(self.vm)
        self._original = self.vm.forward
        self.vm.forward = self._forward

    @contextlib.contextmanager
    def batch(self, keys: list[str]):
        self.keys = [f"{self.identity}:{k}" for k in keys]
        try:
            yield
        finally:
            self.keys = None

    def _forward(self, pixel_values=None, interpolate_pos_encoding: bool = False, **kwargs):
        keys = self.keys
        extra = {k: v for k, v in kwargs.items() if k != "return_dict" or v is not True}
        if keys is None or extra or interpolate_pos_encoding or pixel_values is None or len(keys) != len(pixel_values):
            return self._original(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                  **kwargs)
        if all(k in self.cache for k in keys):
            self.reused_batches += 1
            device = pixel_values.device
            hidden = torch.stack([self.cache.get(k).to(device) for k in keys])
            # InstructBlipVisionModel.forward from the encoder's output on.
            last = self.vm.post_layernorm(hidden)
            return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=self.vm.post_layernorm(last[:, 0, :]))
        # Some image not seen yet: the whole batch through the ViT, exactly as without the cache.
        self.vit_batches += 1
        seen = []
        # Returns None: the encoder's output goes on unchanged.
        handle = self.vm.encoder.register_forward_hook(lambda _m, _a, out: seen.append(out[0]))
        try:
            out = self._original(pixel_values=pixel_values, **kwargs)
        finally:
            handle.remove()
        hidden = seen[0].detach()
        for k, h in zip(keys, hidden):
            if k not in self.cache:
                self.cache.put(k, h.clone())  # a row of its own, not a view keeping the whole batch alive
        return out

    def stats(self) -> dict:
        return {**self.cache.stats(), "vit_batches": self.vit_batches, "reused_batches": self.reused_batches}

    def close(self) -> None:
        """Put the ViT's own forward back and delete the cache (its spill file too)."""
        if self._had_instance_forward:
            self.vm.forward = self._original
        else:
            vars(self.vm).pop("forward", None)
        self.cache.close()
