"""Model presets: the real InstructBLIP checkpoints, and tiny random miniatures of the same classes."""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from transformers import (
    BertTokenizerFast,
    BlipImageProcessorPil,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    PreTrainedTokenizerFast,
)

from .config import load_preset, params_dir, preset_for, preset_names  # noqa: F401 (presets live in config)
from .errors import UserError

IMAGE_TOKEN = "<image>"


# ---------------------------------------------------------------- configs

def architecture_config(preset: dict) -> InstructBlipConfig:
    """The model config without downloading: shipped JSON for real presets, built for tiny ones."""
    if "tiny" in preset:
        return _tiny_config(preset)
    path = params_dir() / preset["architecture"]
    cfg = json.loads(path.read_text())
    cfg.pop("_comment", None)
    return InstructBlipConfig(**{k: v for k, v in cfg.items() if k != "model_type"})


def _tiny_config(preset: dict) -> InstructBlipConfig:
    t = preset["tiny"]
    vocab = len(_tiny_llm_tokenizer(preset["family"]))
    vision = dict(t["vision"], image_size=t["image_size"], patch_size=t["patch_size"],
                  # InstructBlipVisionConfig defaults to initializer_range=1e-10, which makes a random
                  # vision tower output ~0 so the image never reaches the LLM. Use a normal init.
                  initializer_range=0.02)
    qformer = dict(t["qformer"], encoder_hidden_size=t["vision"]["hidden_size"],
                   vocab_size=len(_tiny_qformer_tokenizer()), max_position_embeddings=256)
    if preset["family"] == "t5":
        text = dict(t["text"], model_type="t5", vocab_size=vocab, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False,  # like Flan-T5 checkpoints
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0)
    else:
        text = dict(t["text"], model_type="llama", vocab_size=vocab, max_position_embeddings=512,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text,
                              num_query_tokens=t["num_query_tokens"], image_token_index=vocab - 1)


# ---------------------------------------------------------------- tiny tokenizers (built offline)

# Words the tiny tokenizers know whole; anything else falls back to characters/bytes.
_TINY_WORDS = (
    "Context Question Options Answer Short Image What Which How Is Look "
    "context question options answer short image which what how many is are the a an of in on to and or "
    "color colour shape shapes red green blue yellow purple orange black white gray brown pink circle "
    "square triangle star left right top bottom middle more fewer same count number there picture "
    "science social natural language biology physics chemistry earth weather map animal plant material "
    "select choose best property closest north south east west solid liquid gas hot cold big small "
    "shown stars circles squares triangles at it this that one two three four"
).split()


def _tiny_llm_tokenizer(family: str) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<pad>", "</s>", "<unk>"] if family == "t5" else ["<pad>", "<s>", "</s>", "<unk>"]
    # Byte-level BPE trained on the word list (with and without a leading space): every listed word becomes
    # one token, anything else falls back to bytes. Training on a fixed corpus is deterministic.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, min_frequency=1, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TINY_WORDS + [" " + w for w in _TINY_WORDS], trainer=trainer)
    vocab = tok.get_vocab()
    if family == "t5":  # T5 appends </s> to every sequence
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])])
        kw = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    else:  # LLaMA prepends <s>
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
        kw = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    fast.add_tokens([IMAGE_TOKEN], special_tokens=True)  # last id: the image placeholder
    return fast


def _tiny_qformer_tokenizer() -> BertTokenizerFast:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + _TINY_WORDS
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")


def _tiny_processor(preset: dict) -> InstructBlipProcessor:
    t = preset["tiny"]
    image_processor = BlipImageProcessorPil(
        size={"height": t["image_size"], "width": t["image_size"]}, resample=3,  # bicubic
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    tok = _tiny_llm_tokenizer(preset["family"])
    tok.image_token = IMAGE_TOKEN
    return InstructBlipProcessor(image_processor=image_processor, tokenizer=tok,
                                 qformer_tokenizer=_tiny_qformer_tokenizer(),
                                 num_query_tokens=t["num_query_tokens"])


# ---------------------------------------------------------------- loading

def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs that support it, else fp16 on GPU; fp32 on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(preset: dict | str, source: str | None = None, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", seed: int = 0):
    """Return (model, processor) for a preset.

    Real presets (and any preset given `source`) load with from_pretrained from a hub id or a local
    directory written by save_pretrained. Tiny presets without `source` are built randomly (seeded).
    """
    preset = load_preset(preset) if isinstance(preset, str) else preset
    dtype = dtype or default_dtype(device)
    src = source or preset.get("source")
    if src:
        if source and not Path(source).exists() and "/" not in source:
            raise UserError(f"model source '{source}' is neither a local directory nor a hub id")
        try:
            model = InstructBlipForConditionalGeneration.from_pretrained(src, dtype=dtype)
            processor = InstructBlipProcessor.from_pretrained(src)
        except OSError as e:  # transformers turns hub/network/cache errors into OSError
            local = Path(src).exists()
            fix = ("check that it holds save_pretrained() output" if local else
                   "download it once with network access (it is then cached in the Hugging Face cache; "
                   "HF_HUB_OFFLINE=1 uses only the cache), or point the preset's `source` in "
                   "params/presets.yaml at a local copy")
            raise UserError(f"cannot load model '{src}': {str(e).strip().splitlines()[0].rstrip('.')}. "
                            f"To fix: {fix}") from None
    else:
        config = architecture_config(preset)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = InstructBlipForConditionalGeneration(config).to(dtype)
            # transformers initialises query_tokens to zeros (the checkpoints carry trained ones): all queries
            # would then start identical and the image would barely reach the LLM. BLIP-2 pre-training used
            # normal(0, initializer_range).
            with torch.no_grad():
                model.query_tokens.normal_(0.0, config.qformer_config.initializer_range)
        processor = _tiny_processor(preset)
    _check_placeholder(model, processor)
    return model.to(device), processor


def _check_placeholder(model, processor) -> None:
    """transformers 5.x replaces `num_query_tokens` image tokens in input_ids by the Q-Former output;
    without them the image is silently ignored. Make the mismatch loud."""
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != model.config.image_token_id:
        raise UserError(f"tokenizer's {IMAGE_TOKEN} id {image_id} != model image_token_id "
                        f"{model.config.image_token_id}: processor and model do not belong together")
    if getattr(processor, "num_query_tokens", None) not in (None, model.config.num_query_tokens):
        raise UserError("processor.num_query_tokens differs from the model's num_query_tokens")


def meta_model(preset: dict | str) -> InstructBlipForConditionalGeneration:
    """The full-size architecture on the meta device: no memory, no download."""
    preset = load_preset(preset) if isinstance(preset, str) else preset
    with torch.device("meta"):
        return InstructBlipForConditionalGeneration(architecture_config(preset))


def family_of(model) -> str:
    return "llama" if model.config.use_decoder_only_language_model else "t5"


def set_gradient_checkpointing(model, on: bool) -> None:
    """Recompute activations in the backward pass (less memory, ~30% more compute), or stop doing so.
    transformers 5 names it activation checkpointing (the gradient_checkpointing_* names are deprecated);
    older versions know only the old names."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()
