"""The defaults reproduce the original code (the authors' LAVIS fork) row by row, and each row's setting brings
back the other behaviour: prompt cleaning, the empty context, the uncut LLM prompt at evaluation, LLaMA
candidates without </s>, the dropped last batch, Vicuna weights swapped in from another checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from instructblip_peft.config import Settings, resolve_settings, validate_overrides
from instructblip_peft.data.batches import (QADataset, TrainCollator, encode_prompts, encode_targets, epoch_batches,
                                            make_transform)
from instructblip_peft.data.prompts import candidate_texts, clean_prompt, render_prompt
from instructblip_peft.data.scienceqa import context_of
from instructblip_peft.errors import UserError
from instructblip_peft.evaluate import _encode, evaluate, score_naive
from instructblip_peft.experiments import get_experiment
from instructblip_peft.model import _tiny_llm_tokenizer, load_model, load_preset, preset_for
from instructblip_peft.train import RESUME_SAFE_SETTINGS, train

from train_fixtures import FAST, make_colour_dataset

NEW_SETTINGS = {"eval_max_txt_len": None, "clean_prompt": True, "llama_candidate_eos": False, "drop_last": True}

# A ScienceQA problem as problems.json has it: a hint and a long lecture with ; ! * #, three choices.
LECTURE_SENTENCE = ("A solid has a shape of its own; a liquid takes the shape of its container! "
                    "*Gases* fill any container #science. ")
PROBLEM = {"hint": "Read the text!", "lecture": LECTURE_SENTENCE.strip(), "question": "Which is a liquid?",
           "choices": ["rock", "milk", "air"], "answer": 1}


def record(problem=PROBLEM, image=None, **changes) -> dict:
    p = {**problem, **changes}
    return {"question_id": "q1", "image": image, "question": p["question"], "choices": p["choices"],
            "answer_index": p["answer"], "answer": "", "context": context_of(p), "meta": {}}


@pytest.fixture(scope="module")
def tiny_llama():
    return load_model("tiny-llama", seed=1)


def test_new_settings_default_to_the_original_and_change_results_so_block_a_resume():
    s = resolve_settings(preset=load_preset("tiny-t5"))
    assert {k: s[k] for k in NEW_SETTINGS} == NEW_SETTINGS
    assert not set(NEW_SETTINGS) & RESUME_SAFE_SETTINGS
    assert validate_overrides({"eval_max_txt_len": "128", "clean_prompt": "false"}) == \
        {"eval_max_txt_len": 128, "clean_prompt": False}
    for bad, message in (({"eval_max_txt_len": "0"}, "'eval_max_txt_len' must be positive"),
                         ({"eval_max_txt_len": "all"}, "'eval_max_txt_len' must be int"),
                         ({"drop_last": "3"}, "'drop_last' must be bool")):
        with pytest.raises(UserError, match=message):
            validate_overrides(bad)


# ---------------------------------------------------------------- row 3: prompt cleaning

def test_prompt_is_cleaned_like_the_original():
    cleaned = ("Context: {Read the text A solid has a shape of its own a liquid takes the shape of its container "
               "Gases fill any container science.} Question: {Which is a liquid?} "
               "Options: {(a) rock\n(b) milk\n(c) air\n} Answer:")
    assert render_prompt(record(), "scienceqa") == cleaned
    raw = render_prompt(record(), "scienceqa", clean=False)
    assert "Read the text! A solid has a shape of its own; a liquid" in raw and "*Gases* fill any container #" in raw
    # Trailing spaces go; at most 1000 space-separated words stay (the question would be cut after them).
    assert clean_prompt("Answer:   ") == "Answer:"
    long = render_prompt(record(lecture="word " * 1200), "scienceqa")
    assert len(long.split(" ")) == 1000 and long.endswith("word")
    # The answer is not cleaned.
    assert candidate_texts(record(choices=["yes!", "no;"])) == ["(a) yes!", "(b) no;"]


def test_training_and_evaluation_read_the_cleaned_prompt_unless_switched_off(tiny_llama, tmp_path):
    _, processor = tiny_llama
    r = record()
    transform = make_transform(processor, resolve_settings(preset=load_preset("tiny-llama")), train=True)
    assert QADataset([r], tmp_path, "scienceqa", transform)[0]["prompt"] == render_prompt(r, "scienceqa")
    assert QADataset([r], tmp_path, "scienceqa", transform, clean_prompt=False)[0]["prompt"] == \
        render_prompt(r, "scienceqa", clean=False)
    for clean in (True, False):
        s = resolve_settings(preset=load_preset("tiny-llama"), overrides={"clean_prompt": clean})
        assert _encode([r], processor, "scienceqa", s).prompts == [render_prompt(r, "scienceqa", clean)]


# ---------------------------------------------------------------- row 4: empty context

def test_empty_hint_and_lecture_read_as_the_original_context():
    r = record(hint="", lecture="")
    assert r["context"] == ""  # processed data is unchanged: the space is the template's
    assert render_prompt(r, "scienceqa") == ("Context: { } Question: {Which is a liquid?} "
                                             "Options: {(a) rock\n(b) milk\n(c) air\n} Answer:")
    assert render_prompt(record(lecture=""), "scienceqa").startswith("Context: {Read the text } Question:")


# ---------------------------------------------------------------- row 1: the LLM prompt at evaluation

def test_evaluation_gives_the_llm_the_whole_prompt_and_the_qformer_max_txt_len(tiny_llama):
    _, processor = tiny_llama
    tok = processor.tokenizer
    r = record(lecture=LECTURE_SENTENCE * 12)
    prompt = render_prompt(r, "scienceqa")
    full = tok(prompt)["input_ids"]
    s = resolve_settings(preset=load_preset("tiny-llama"))
    assert len(full) > s.max_txt_len + 50
    n_query = processor.num_query_tokens
    enc = _encode([r], processor, "scienceqa", s)
    assert enc.llm_ids[0][n_query:] == full  # the hint, first in the prompt, is still there
    assert tok.decode(enc.llm_ids[0][n_query:], skip_special_tokens=True).startswith("Context: {Read the text")
    assert len(enc.qformer_ids[0]) == s.max_txt_len  # the Q-Former text is cut, from the left
    # Training cuts the LLM prompt from the left too: the hint goes first.
    item = {"prompt": prompt, "target": "(b) milk", "pixel_values": torch.zeros(3, 32, 32)}
    train_ids = TrainCollator(processor, "llama", s.max_txt_len, s.max_output_txt_len)([item])["input_ids"][0]
    assert train_ids[n_query:n_query + s.max_txt_len].tolist() == [tok.bos_token_id] + full[-(s.max_txt_len - 1):]
    # eval_max_txt_len cuts the LLM prompt at evaluation as in training (the Q-Former text is unchanged).
    cut = _encode([r], processor, "scienceqa", resolve_settings(preset=load_preset("tiny-llama"),
                                                                overrides={"eval_max_txt_len": 40}))
    assert cut.llm_ids[0][n_query:] == tok(prompt, truncation=True, max_length=40)["input_ids"]
    assert cut.llm_ids[0][-5:] == full[-5:] and cut.qformer_ids == enc.qformer_ids


@pytest.mark.parametrize("preset", ["tiny-t5", "tiny-llama"])
def test_uncut_long_prompts_score_as_the_naive_method_and_the_cut_changes_the_scores(preset, tmp_path):
    model, processor = load_model(preset, seed=2)
    family = "t5" if preset == "tiny-t5" else "llama"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    # ~50, ~250 and ~450 prompt tokens: one under max_txt_len (96 here), two far over it.
    records = [record(hint="", lecture="", image="a.png")] + [record(lecture=LECTURE_SENTENCE * n, image="a.png")
                                                              for n in (4, 8)]
    s = resolve_settings(preset=load_preset(preset), overrides={"eval_batch_size": 2})
    result = evaluate(model, processor, records, tmp_path, "scienceqa", s, family, progress=False)
    naive = score_naive(model, processor, records, tmp_path, "scienceqa", s, family)
    for pred, ref in zip(result.predictions, naive, strict=True):
        np.testing.assert_allclose(pred["scores"], ref, rtol=1e-4)
    s_cut = resolve_settings(preset=load_preset(preset), overrides={"eval_max_txt_len": s.max_txt_len})
    cut = evaluate(model, processor, records, tmp_path, "scienceqa", s_cut, family, progress=False)
    np.testing.assert_allclose(cut.predictions[0]["scores"], result.predictions[0]["scores"], rtol=1e-4)
    assert not np.allclose(cut.predictions[2]["scores"], result.predictions[2]["scores"], rtol=1e-3)


# ---------------------------------------------------------------- row 2: LLaMA candidates without </s>

def _reference_llama_scores(model, processor, r, image_root, settings, eos: bool) -> list[float]:
    """Independent of the package's encoding: [image placeholders] <s> prompt, then each candidate's tokens
    (no <s>; </s> only if `eos`), one full forward each, cross-entropy summed over the candidate tokens."""
    tok, qtok = processor.tokenizer, processor.qformer_tokenizer
    model.eval()  # no dropout
    prompt = render_prompt(r, "scienceqa")
    pixel_values = make_transform(processor, settings, train=False)(Image.open(image_root / r["image"]).convert("RGB"))
    qtok.truncation_side = "left"
    qids = torch.tensor([qtok(prompt, truncation=True, max_length=settings.max_txt_len)["input_ids"]])
    head = [model.config.image_token_id] * processor.num_query_tokens + tok(prompt)["input_ids"]
    scores = []
    for cand in candidate_texts(r):
        tail = tok(cand, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
        ids = torch.tensor([head + tail])
        with torch.no_grad():
            logits = model(pixel_values=pixel_values[None], qformer_input_ids=qids,
                           qformer_attention_mask=torch.ones_like(qids), input_ids=ids,
                           attention_mask=torch.ones_like(ids)).logits
        scores.append(F.cross_entropy(logits[0, len(head) - 1:-1].float(), torch.tensor(tail), reduction="sum").item())
    return scores


def test_llama_candidates_are_scored_without_eos_by_default(tiny_llama, tmp_path):
    model, processor = tiny_llama
    tok = processor.tokenizer
    Image.new("RGB", (40, 40), (30, 60, 220)).save(tmp_path / "b.png")
    r = record(image="b.png")
    assert candidate_texts(r) == ["(a) rock", "(b) milk", "(c) air"]
    ids = encode_targets(processor, candidate_texts(r), "llama", 256, llama_eos=False)
    assert ids == [tok(c, add_special_tokens=False)["input_ids"] for c in candidate_texts(r)]
    assert all(tok.eos_token_id not in t and tok.bos_token_id not in t for t in ids)
    for eos in (False, True):
        s = resolve_settings(preset=load_preset("tiny-llama"), overrides={"llama_candidate_eos": eos})
        got = evaluate(model, processor, [r], tmp_path, "scienceqa", s, "llama", progress=False).predictions[0]
        np.testing.assert_allclose(got["scores"], _reference_llama_scores(model, processor, r, tmp_path, s, eos),
                                   rtol=1e-4)


def test_t5_candidates_keep_eos_whatever_the_llama_setting():
    _, processor = load_model("tiny-t5")
    for llama_eos in (False, True):
        ids = encode_targets(processor, ["(a) rock", "(b) milk", "(c) air"], "t5", 256, llama_eos=llama_eos)
        assert all(t[-1] == processor.tokenizer.eos_token_id for t in ids)


# ---------------------------------------------------------------- row 5: the last partial batch

def test_the_last_partial_training_batch_is_dropped():
    batches = epoch_batches(10, 4, seed=42, epoch=0, drop_last=True)
    assert [len(b) for b in batches] == [4, 4] and len({i for b in batches for i in b}) == 8
    assert batches == epoch_batches(10, 4, seed=42, epoch=0)[:2]
    grouped = epoch_batches(10, 4, seed=42, epoch=0, lengths=list(range(10)), group_by_length=True, drop_last=True)
    assert sorted(len(b) for b in grouped) == [4, 4]
    assert [len(b) for b in epoch_batches(12, 4, seed=0, epoch=0, drop_last=True)] == [4, 4, 4]
    assert [len(b) for b in epoch_batches(3, 4, seed=0, epoch=0, drop_last=True)] == [3]  # never an empty epoch


def test_training_run_uses_the_settings(tmp_path, monkeypatch):
    """A run drops the last partial batch by default and passes clean_prompt to its training data."""
    from instructblip_peft.data import batches

    seen = []

    class Spy(batches.QADataset):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            seen.append(item["prompt"])
            return item

    from instructblip_peft import train as train_module

    monkeypatch.setattr(train_module, "QADataset", Spy)
    data = make_colour_dataset(tmp_path / "processed", n_train=10, n_eval=4)
    metrics = train("scienceqa", "31", tmp_path / "run", dataset_dir=data, preset="tiny", progress=False,
                    **dict(FAST, epochs=1, max_train_samples=10, clean_prompt=False))
    assert metrics["global_steps"] == 2  # 10 records, batches of 4: the last 2 are dropped
    assert len(seen) == 8 and all(p.startswith("Context: { } Question: {Which color is the picture?}") for p in seen)


# ---------------------------------------------------------------- row 6: Vicuna weights from another checkpoint

def test_vicuna_experiments_default_to_the_original_llm_and_keep_the_bundled_one_as_a_preset():
    default = preset_for(get_experiment("61"), None)
    assert default["source"] == "Salesforce/instructblip-vicuna-7b"
    assert default["llm_source"] == "lmsys/vicuna-7b-v1.3"
    bundled = load_preset("vicuna7b-bundled")
    assert bundled["source"] == default["source"] and bundled.get("llm_source") is None
    assert preset_for(get_experiment("61"), "vicuna7b-bundled")["name"] == "vicuna7b-bundled"


def _save_tiny_llama(path, vocab_tokenizer, seed, hidden=64):
    """A plain tiny LLaMA (no <image> token) written by save_pretrained, as lmsys/vicuna-7b-v1.3 is."""
    config = LlamaConfig(vocab_size=len(vocab_tokenizer), hidden_size=hidden, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(seed)
    donor = LlamaForCausalLM(config)
    donor.save_pretrained(path)
    vocab_tokenizer.save_pretrained(path)
    return donor


def test_llm_source_swaps_in_the_language_model_weights(tmp_path):
    instructblip_dir = tmp_path / "instructblip"
    original, processor = load_model("tiny-llama", seed=1)
    original.save_pretrained(instructblip_dir)
    processor.save_pretrained(instructblip_dir)
    donor = _save_tiny_llama(tmp_path / "vicuna", _tiny_llm_tokenizer("llama", image_token=False), seed=7)
    preset = {**load_preset("tiny-llama"), "source": str(instructblip_dir), "llm_source": str(tmp_path / "vicuna")}
    model, _ = load_model(preset)

    rows = donor.config.vocab_size
    assert rows == original.config.text_config.vocab_size - 1  # InstructBLIP added <image>
    got, before = dict(model.language_model.named_parameters()), dict(original.language_model.named_parameters())
    for name, weight in donor.named_parameters():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            torch.testing.assert_close(got[name][:rows], weight, rtol=0, atol=0)
            torch.testing.assert_close(got[name][rows:], before[name][rows:], rtol=0, atol=0)  # <image> kept
        else:
            torch.testing.assert_close(got[name], weight, rtol=0, atol=0)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           before["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(model.query_tokens, original.query_tokens, rtol=0, atol=0)  # only the LLM changes
    for (name, a), b in zip(model.qformer.named_parameters(), original.qformer.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_llm_source_mismatches_are_one_clear_error(tmp_path):
    llama_vocab = _tiny_llm_tokenizer("llama", image_token=False)
    _save_tiny_llama(tmp_path / "wide", llama_vocab, seed=0, hidden=32)
    _save_tiny_llama(tmp_path / "other-vocab", _tiny_llm_tokenizer("t5", image_token=False), seed=0)
    (tmp_path / "empty").mkdir()
    for name, message in (("wide", r"llm_source '.*wide'.*shape \(642, 32\), expected \(642, 64\)"),
                          ("other-vocab", r"llm_source '.*other-vocab': vocabulary mismatch .*first: id 1 is "
                                          r"'</s>' there, '<s>' here"),
                          ("empty", r"cannot load the language model '.*empty' \(llm_source\)")):
        with pytest.raises(UserError, match=message):
            load_model({**load_preset("tiny-llama"), "llm_source": str(tmp_path / name)})


def test_preset_fields_are_checked(tmp_path, monkeypatch):
    import shutil

    from instructblip_peft import config
    dst = tmp_path / "params"
    shutil.copytree(config.params_dir(), dst)
    monkeypatch.setenv("INSTRUCTBLIP_PEFT_PARAMS", str(dst))
    text = (dst / "presets.yaml").read_text()
    (dst / "presets.yaml").write_text(text.replace("  llm_source: lmsys/vicuna-7b-v1.3", "  llm_sorce: x", 1))
    with pytest.raises(UserError, match="presets.yaml: preset 'vicuna7b' has unknown field 'llm_sorce'"):
        load_preset("vicuna7b")
    (dst / "presets.yaml").write_text(text.replace("  llm_source: lmsys/vicuna-7b-v1.3", "  llm_source: 7", 1))
    with pytest.raises(UserError, match="preset 'vicuna7b': 'llm_source' must be a hub id or a directory, got 7"):
        load_preset("vicuna7b")


# ---------------------------------------------------------------- runs recorded before these settings

def test_settings_recorded_without_the_new_keys_evaluate_as_before(tiny_llama):
    _, processor = tiny_llama
    r = record(lecture=LECTURE_SENTENCE * 12)
    old = Settings({k: v for k, v in resolve_settings(preset=load_preset("tiny-llama")).items()
                    if k not in NEW_SETTINGS})
    enc = _encode([r], processor, "scienceqa", old)
    assert enc.prompts == [render_prompt(r, "scienceqa", clean=False)]
    assert enc.llm_ids == encode_prompts(processor, enc.prompts, old.max_txt_len)["input_ids"]
