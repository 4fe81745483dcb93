"""Model presets: the real InstructBLIP checkpoints, and tiny random miniatures of the same classes."""
from __future__ import annotations

import functools
import json
import string
import tempfile
from dataclasses import dataclass
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

from .config import check_precision, params_dir
from .config import load_preset, preset_for, preset_names  # noqa: F401 (presets live in config)
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


def _tiny_llm_tokenizer(family: str, image_token: bool = True) -> PreTrainedTokenizerFast:
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
    if image_token:  # without it: the plain LLM's tokenizer (a stand-in for the original's Vicuna)
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


# ---------------------------------------------------------------- precision

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How a run computes: `mixed_precision` is the autocast of training and evaluation ('no', 'bf16' or
    'fp16'; fp16 adds loss scaling), `dtype` the frozen base weights. Trained tensors are always fp32."""
    mixed_precision: str
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    def to_dict(self) -> dict:
        return {"mixed_precision": self.mixed_precision, "model_dtype": self.dtype_name}


@functools.lru_cache(maxsize=None)
def cpu_supports_fp16() -> bool:
    """Whether this CPU build runs an fp16 matmul under autocast, forward and backward (no RNG drawn)."""
    try:
        x = torch.ones(2, 8, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.float16):
            y = torch.nn.functional.linear(x, torch.ones(8, 8, dtype=torch.float16))
        y.float().sum().backward()
        return y.dtype == torch.float16 and x.grad is not None
    except (RuntimeError, NotImplementedError):
        return False


def resolve_precision(mixed_precision: str = "auto", model_dtype: str = "auto",
                      device: torch.device | str = "cpu") -> Precision:
    """The settings `mixed_precision` and `model_dtype` on `device`. mixed_precision auto: bf16 on GPUs that
    support it, else fp16; no autocast on CPU. model_dtype auto: fp32 without autocast, else the autocast's
    type. Any mode runs on CPU too (bf16 there is the dtype mix of a bf16 GPU run)."""
    device = torch.device(device)
    mode = mixed_precision
    if mode == "auto":
        if device.type != "cuda":
            mode = "no"
        else:
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode not in ("no", *AUTOCAST_DTYPES):
        raise UserError(f"setting 'mixed_precision' must be one of auto, no, bf16, fp16, got {mixed_precision!r}")
    if model_dtype == "auto":
        dtype = AUTOCAST_DTYPES.get(mode, torch.float32)
    elif model_dtype in DTYPES:
        dtype = DTYPES[model_dtype]
    else:
        raise UserError(f"setting 'model_dtype' must be one of auto, {', '.join(DTYPES)}, got {model_dtype!r}")
    check_precision(mode, next(k for k, v in DTYPES.items() if v == dtype))
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("setting 'mixed_precision' bf16: this GPU does not support bf16; use fp16 (or auto)")
    if mode == "fp16" and device.type == "cpu" and not cpu_supports_fp16():
        raise UserError("setting 'mixed_precision' fp16: this CPU's PyTorch cannot run fp16 matmuls under autocast; "
                        "use bf16 or no on CPU")
    return Precision(mode, dtype)


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs that support it, else fp16 on GPU; fp32 on CPU (model_dtype auto with mixed_precision auto)."""
    return resolve_precision("auto", "auto", device).dtype


# ---------------------------------------------------------------- loading

def _device_map(device: torch.device) -> dict:
    """from_pretrained's device_map for one device: the weights go from the (memory-mapped) files straight to
    it, so a GPU load never holds a full copy of the model in CPU RAM."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {"": device}


def load_processor(source: str) -> InstructBlipProcessor:
    """The checkpoint's processor with the PIL image backend, whatever else is installed: transformers 5 picks
    torchvision when it can, which resizes differently from PIL (and from the original and the tests)."""
    processor = InstructBlipProcessor.from_pretrained(source, backend="pil")
    if type(processor.image_processor) is not BlipImageProcessorPil:
        processor.image_processor = BlipImageProcessorPil.from_pretrained(source)
    return processor


def quantization_config(quantize: str, compute_dtype: torch.dtype):
    """The bitsandbytes config of `quantize` (4bit | 8bit; None for none): the LLM's linear layers are
    quantized; the ViT, Q-Former, projection and lm_head (experiments.yaml: quantization.skip_modules) are not."""
    if quantize in (None, "none"):
        return None
    from transformers import BitsAndBytesConfig

    from .experiments import quantization_spec
    spec = quantization_spec()
    skip = list(spec["skip_modules"])
    if quantize == "4bit":
        four = spec["4bit"]
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=four["quant_type"],
                                  bnb_4bit_use_double_quant=bool(four["double_quant"]),
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip)
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise UserError(f"quantize must be one of none, 4bit, 8bit; got {quantize!r}")


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def load_model(preset: dict | str, source: str | None = None, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", seed: int = 0, quantize: str = "none",
               llm_source: str | None = None):
    """Return (model, processor) for a preset, the model on `device` in `dtype` (default: default_dtype).

    Real presets (and any preset given `source`) load with from_pretrained from a hub id or a local
    directory written by save_pretrained, straight onto `device`. Tiny presets without `source` are built
    randomly (seeded). The image processor is always PIL's (load_processor).
    `quantize` (4bit | 8bit) loads the LLM through bitsandbytes, straight onto `device`; a tiny preset is
    then built, written with save_pretrained to a temporary directory and loaded back the same way, so
    it takes the real presets' path.
    `llm_source` (or the preset's): the language model's weights then come from this checkpoint instead
    (see swap_language_model).
    """
    preset = load_preset(preset) if isinstance(preset, str) else preset
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    src = source or preset.get("source")
    llm_src = preset.get("llm_source") if llm_source is None else llm_source  # "": no swap
    if quantize not in (None, "none") and (not src or llm_src):
        # bitsandbytes quantizes while loading: a model built from a seed, or one whose LLM weights come from
        # another checkpoint, is made unquantized first and loaded back quantized from a temporary directory.
        from transformers.utils import logging as hf_logging

        model, processor = load_model(preset, source=source, dtype=dtype, device="cpu", seed=seed,
                                      llm_source=llm_src or "")
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a round trip through a temporary directory: nothing to watch
        try:
            with tempfile.TemporaryDirectory(prefix="instructblip-peft-") as tmp:
                model.save_pretrained(tmp)
                processor.save_pretrained(tmp)
                model, processor = load_model(preset, source=tmp, dtype=dtype, device=device, quantize=quantize,
                                              llm_source="")
            # Not the temporary directory: the real source, or none for a model built from a seed (peft looks
            # for a config there, or on the hub, when saving an adapter).
            model.config._name_or_path = src or ""
            return model, processor
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    if src:
        if source and not Path(source).exists() and "/" not in source:
            raise UserError(f"model source '{source}' is neither a local directory nor a hub id")
        quant = quantization_config(quantize, dtype)
        kwargs = {"device_map": _device_map(device)}
        if quant is not None:
            kwargs["quantization_config"] = quant
        try:
            model = InstructBlipForConditionalGeneration.from_pretrained(src, dtype=dtype, **kwargs)
            processor = load_processor(src)
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
    if llm_src:
        swap_language_model(model, processor, llm_src)
    if is_quantized(model):  # already on `device` (bitsandbytes weights cannot be moved with .to)
        _no_packed_cpu_weights(model)
        return model, processor
    return model.to(device), processor


def _load_language_model(src: str, family: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    cls = AutoModelForCausalLM if family == "llama" else AutoModelForSeq2SeqLM
    try:
        # Straight onto the InstructBLIP model's device, like the model itself: no full copy in CPU RAM.
        return (cls.from_pretrained(src, dtype=dtype, device_map=_device_map(device)),
                AutoTokenizer.from_pretrained(src))
    except (OSError, ValueError, ImportError) as e:  # hub/network/cache errors; another kind of checkpoint
        local = Path(src).exists()
        fix = ("check that it holds a language model and its tokenizer written by save_pretrained()" if local
               else "download it once with network access, or point the preset's `llm_source` in "
                    "params/presets.yaml at a local copy")
        raise UserError(f"cannot load the language model '{src}' (llm_source): "
                        f"{str(e).strip().splitlines()[0].rstrip('.')}. To fix: {fix}") from None


def swap_language_model(model, processor, llm_source: str) -> None:
    """Replace the weights of `model.language_model` by those of the checkpoint `llm_source` (in place).

    This is how the original set up Vicuna: InstructBLIP's pre-trained Q-Former next to lmsys/vicuna-7b-v1.3,
    where the Hugging Face InstructBLIP checkpoint bundles the Vicuna (v1.1) InstructBLIP was trained with.
    The donor's vocabulary must be the first rows of the InstructBLIP tokenizer's; the rows past it (the
    tokens InstructBLIP added, `[PAD]` and `<image>`) keep the InstructBLIP checkpoint's embeddings. Every
    other weight must match in name and shape. The InstructBLIP config (and tokenizer) stay.
    """
    lm = model.language_model
    donor, donor_tok = _load_language_model(llm_source, family_of(model), lm.dtype, lm.device)
    where = f"llm_source '{llm_source}'"
    for key in ("num_attention_heads", "num_key_value_heads", "num_heads"):
        mine, theirs = getattr(lm.config, key, None), getattr(donor.config, key, None)
        if mine != theirs:
            raise UserError(f"{where}: {key} is {theirs}, the InstructBLIP language model's is {mine}")
    rows = donor.get_input_embeddings().weight.shape[0]
    have = lm.get_input_embeddings().weight.shape[0]
    if rows > have:
        raise UserError(f"{where}: vocabulary of {rows} embedding rows, more than the InstructBLIP language "
                        f"model's {have}")
    ours = {i: t for t, i in processor.tokenizer.get_vocab().items() if i < rows}
    theirs = {i: t for t, i in donor_tok.get_vocab().items() if i < rows}
    differ = sorted(i for i in set(ours) | set(theirs) if ours.get(i) != theirs.get(i))
    if differ:
        i = differ[0]
        raise UserError(f"{where}: vocabulary mismatch with the InstructBLIP tokenizer at {len(differ)} of its "
                        f"{rows} ids (first: id {i} is {theirs.get(i)!r} there, {ours.get(i)!r} here)")
    vocab_tensors = {id(lm.get_input_embeddings().weight), id(lm.get_output_embeddings().weight)}
    mine = dict(lm.named_parameters(remove_duplicate=False))
    given = dict(donor.named_parameters(remove_duplicate=False))
    missing = sorted(set(mine) - set(given))
    extra = sorted(set(given) - set(mine))
    if missing or extra:
        what = f"lacks '{missing[0]}'" if missing else f"has '{extra[0]}', which the InstructBLIP one lacks"
        raise UserError(f"{where}: not the same architecture as the InstructBLIP language model (it {what})")
    with torch.no_grad():
        for name, target in mine.items():
            src = given[name]
            if id(target) in vocab_tensors:
                if src.shape[0] != rows or src.shape[1:] != target.shape[1:]:
                    raise UserError(f"{where}: '{name}' has shape {tuple(src.shape)}, expected ({rows}, "
                                    f"{', '.join(map(str, target.shape[1:]))})")
                target[:rows].copy_(src)
            elif src.shape != target.shape:
                raise UserError(f"{where}: '{name}' has shape {tuple(src.shape)}, the InstructBLIP language "
                                f"model's has {tuple(target.shape)}")
            else:
                target.copy_(src)
    del donor


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


def _no_packed_cpu_weights(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a bf16 inference kernel the first
    time the layer runs in eval mode, for good: training after an evaluation would then compute in bf16 and
    pass no gradient to the layer's input (adapters before it stop learning). Keep the one differentiable
    kernel, in eval and training alike."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


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
