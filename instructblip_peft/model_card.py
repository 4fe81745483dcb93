"""The model card (`README.md`) of an exported run, in the hub's format: a YAML header (base_model,
library_name, datasets, metrics, tags, ...) and then Markdown: the experiment, the method and where its
adapters sit, trainable parameters, val/test accuracy with the per-category breakdown, the recipe, how to
load it, and the citation.

Numbers come from the run (run.json, metrics.json, the adapter's own config); wording that is not the run's
(hub dataset ids, tags, citation) from params/export.yaml.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .config import load_yaml
from .data.prompts import candidate_texts, render_prompt
from .experiments import get_experiment, lora_spec
from .hf_hub import is_repo_id


def card_settings() -> dict:
    return load_yaml("export.yaml")


def base_model_id(info: dict) -> str | None:
    """The hub id of the model the run started from; None for tiny presets and local directories."""
    source = info.get("model_source")
    if source and is_repo_id(str(source)) and not Path(str(source)).exists():
        return str(source)
    return None


def _llm_label(llm: str) -> str:
    return next((x["label"] for x in load_yaml("experiments.yaml")["llms"] if x["name"] == llm), llm)


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f} %" if whole else "-"


def _accuracy(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def header(info: dict, merged: bool) -> dict:
    spec = card_settings()
    dataset = info["dataset"]
    meta = {}
    base = base_model_id(info)
    if base:
        meta["base_model"] = base
    meta["library_name"] = "transformers" if merged else "peft"
    meta["pipeline_tag"] = spec["pipeline_tag"]
    meta["datasets"] = list((spec.get("datasets") or {}).get(dataset) or [])
    meta["metrics"] = list(spec["metrics"])
    tags = [*spec["tags"], dataset, info.get("family") or get_experiment(info["experiment"]).family]
    meta["tags"] = list(dict.fromkeys(tags + (["merged"] if merged else [])))
    return meta


def model_card(info: dict, metrics: dict, *, merged: bool, where: str, adapter_config: dict | None = None) -> str:
    """The card's text. `where`: what a reader passes to load it (a hub repo id, or the folder's name);
    `adapter_config`: the run's adapter_config.json (its rank, alpha, dropout), when it has LoRA."""
    from .accounting import account

    spec = card_settings()
    exp = get_experiment(info["experiment"])
    dataset = info["dataset"]
    dataset_label = (spec.get("dataset_labels") or {}).get(dataset, dataset)
    llm = _llm_label(exp.llm)
    rank = f", rank {exp.rank}" if exp.rank else ""
    settings = info.get("settings") or {}
    family = info.get("family") or exp.family
    base = base_model_id(info)
    if base:
        base_text = f"[`{base}`](https://huggingface.co/{base})"
    elif info.get("model_source"):
        base_text = f"`{info['model_source']}` (a local checkpoint; the adapter needs the same one)"
    else:
        base_text = (f"the `{info['preset']}` preset: a random miniature of the InstructBLIP classes, rebuilt "
                     f"from seed {info.get('model_seed', 0)} (for tests and demos; it knows nothing)")

    out = ["---", yaml.safe_dump(header(info, merged), sort_keys=False, allow_unicode=True).strip(), "---", ""]
    model_name = llm if base or info.get("model_source") else f"{info['preset']} (a miniature standing in for {llm})"
    out += [f"# InstructBLIP {model_name}: {exp.label}{rank}, fine-tuned on {dataset_label}", ""]
    out += [f"Experiment `{exp.id}` of the grid of {' '.join(str(spec['paper']).split())}, trained with "
            f"[instructblip-peft]({spec['code_url']}) and exported "
            + ("with LoRA merged into the weights: a plain transformers checkpoint." if merged else
               "as a LoRA adapter plus the other tensors that trained."), ""]

    out += ["## Experiment", "",
            "| | |", "|---|---|",
            f"| dataset | {dataset_label} (`{dataset}`) |",
            f"| experiment | `{exp.id}`: {exp.label}{rank} ({llm}) |",
            f"| base model | {base_text} |",
            f"| epochs run | {metrics.get('epochs_run')} (best val at epoch {metrics.get('best_epoch')}; "
            f"stopped: {metrics.get('stopped') or 'after the last epoch'}) |",
            f"| optimizer steps | {metrics.get('global_steps')} |", ""]

    out += ["## Method", ""]
    if exp.has_lora and exp.train:
        # The run's own values: its settings (lora_alpha, lora_dropout, peft_method), then its adapter_config.
        lora = dict(lora_spec(), rank=exp.rank, alpha=settings.get("lora_alpha"),
                    dropout=settings.get("lora_dropout"))
        for key, name in (("r", "rank"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout"), ("bias", "bias")):
            if adapter_config and key in adapter_config:
                lora[name] = adapter_config[key]
        method = {"lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA", "adalora": "AdaLoRA", "ia3": "IA3"}.get(
            settings.get("peft_method", "lora"), settings.get("peft_method"))
        out += [f"{method} (rank {lora['rank']}, alpha {lora['alpha']}, dropout {lora['dropout']}, bias "
                f"{lora['bias']}), applied with `peft` to the modules below"
                + (", then merged into their weights." if merged else "."), ""]
    elif exp.train:
        out += [f"{exp.label}: no LoRA; the tensors below train in full.", ""]
    else:
        out += [f"{exp.label}: nothing trained; the base model as it is.", ""]
    placement = account(exp, info["preset"], placement=True)
    if placement["lora_modules"]:
        out += ["Where the adapters sit (layer numbers as `*`):", "", "| module | how many |", "|---|---|"]
        out += [f"| `{name}` | {n} |" for name, n in placement["lora_modules"].items()]
        out += [""]
    if placement["non_lora_trainable"]:
        out += ["Also trained (whole tensors): "
                + ", ".join(f"`{part}` ({n:,})" for part, n in sorted(placement["non_lora_trainable"].items()))
                + ". The vision encoder and the LLM's base weights are frozen.", ""]

    trainable, total = metrics.get("trainable_params") or 0, metrics.get("total_params") or 0
    full = metrics.get("full_qformer_params") or 0
    out += ["## Trainable parameters", "",
            f"{trainable:,} of {total:,} ({_percent(trainable, total)}); LoRA {metrics.get('lora_params') or 0:,}. "
            f"That is {_percent(trainable, full)} of InstructBLIP's own full Q-Former fine-tuning ({full:,}).", ""]

    out += ["## Results", "",
            "Accuracy (%) by ranking the candidates: each `(a) choice` is scored by the LLM's summed token "
            "cross-entropy given the image and the prompt, and the lowest wins. Test is measured with the "
            "best-val weights, the weights exported here.", "",
            "| split | accuracy |", "|---|---|",
            f"| val | {_accuracy(metrics.get('val_accuracy'))} |",
            f"| test | {_accuracy(metrics.get('test_accuracy'))} |", ""]
    val_b, test_b = metrics.get("val_breakdown") or {}, metrics.get("test_breakdown") or {}
    categories = list(dict.fromkeys([*test_b, *val_b]))
    if categories:
        out += ["Per category:", "", "| category | val | test |", "|---|---|---|"]
        out += [f"| {c} | {_accuracy(val_b.get(c))} | {_accuracy(test_b.get(c))} |" for c in categories]
        out += [""]

    example = {"context": "<context>", "question": "<question>", "choices": ["<first choice>", "<second choice>"]}
    out += ["## Recipe", "",
            "The prompt, as params/data.yaml renders it for two choices (the Q-Former reads it; the LLM reads the "
            "image's query tokens, then it), and the answer it is trained to give:", "",
            "```text", render_prompt(example, dataset), "```", "",
            "```text", candidate_texts(dict(example, answer_index=0))[0], "```", "",
            "Settings of the run:", "", "| setting | value |", "|---|---|"]
    out += [f"| `{k}` | `{v}` |" for k, v in settings.items()]
    out += [""]

    out += ["## Use it", ""]
    if merged:
        out += ["With transformers alone:", "", "```python",
                "from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor",
                f'model = InstructBlipForConditionalGeneration.from_pretrained("{where}")',
                f'processor = InstructBlipProcessor.from_pretrained("{where}")', "```", "",
                "Ask in the prompt format of the Recipe and rank the candidates as in Results (or generate)."]
        if family == "t5":
            out[-1] += " Scoring one candidate:"
            out += ["", "```python",
                    "from PIL import Image",
                    'inputs = processor(images=Image.open("picture.png").convert("RGB"), text=prompt, '
                    'return_tensors="pt")',
                    'labels = processor.tokenizer("(a) first choice", return_tensors="pt").input_ids  # ends in </s>',
                    "score = model(**inputs, labels=labels).loss.item() * labels.shape[1]  # the lowest choice wins",
                    "```", ""]
        else:
            out[-1] += (" A candidate's score is the summed cross-entropy of its tokens and a final `</s>` (no "
                        "`<s>` before it), continuing the prompt.")
            out += [""]
        out += [f"With [instructblip-peft]({spec['code_url']}) the same folder also works with `Predictor` and "
                "`instructblip-peft predict` below.", ""]
    else:
        out += [f"With [instructblip-peft]({spec['code_url']}) installed (`pip install git+{spec['code_url']}`):", "",
                "```python", "from instructblip_peft.predict import Predictor",
                f'predictor = Predictor("{where}")  # base model + LoRA adapter + trained tensors',
                'print(predictor.ask("Which color is the picture?", choices=["red", "blue"], image="picture.png"))',
                "```", "",
                f'`instructblip_peft.finetuned.load_finetuned("{where}")` returns the model itself '
                "(`model, processor, info`). The adapter alone is in peft's format in `adapter/`.", ""]
    out += ["From the command line:", "", "```bash",
            f'instructblip-peft predict {where} --image picture.png --question "Which color is the picture?" '
            "--choice red --choice blue", "```", ""]
    files = (["`config.json`, `generation_config.json`, `model*.safetensors`: the merged model",
              "the processor's files (image processor, tokenizer, Q-Former tokenizer)"] if merged else
             ["`adapter/`: the LoRA adapter (peft)", "`trained_tensors.safetensors`: the other trained tensors"])
    files += ["`run.json`: dataset, experiment, base model and every setting",
              "`metrics.json`: accuracies, breakdowns, parameter counts, training history"]
    out += ["Files:", ""] + [f"- {f}" for f in files] + [""]

    out += ["## Citation", "", "```bibtex", str(spec["citation"]).strip(), "```", ""]
    return "\n".join(out)


def read_header(text: str) -> dict:
    """The YAML header of a card's text ({} when there is none)."""
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    return yaml.safe_load(text[4:end]) or {} if end > 0 else {}
