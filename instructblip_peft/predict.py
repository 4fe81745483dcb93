"""Asking a fine-tuned model about new questions: `Predictor(source).ask(question, choices, image)`,
`predict(...)` for one question, `predict_file(...)` for a JSONL of them.

`source` is a run directory, an exported folder (`instructblip-peft export`) or a hub repo id.
With choices, they are ranked by evaluation's own code (evaluate.evaluate with the run's settings: the
run's dataset template, each candidate's summed cross-entropy, the lowest wins), so a question of the
test split gets exactly the prediction the run recorded for it. Without choices the model generates a free
answer to the prompt rendered with no options.

A question is a dict in the custom data format (data/custom.py): `question`, and optionally `image` (a
path; none: the blank image text-only questions get), `choices`, `context`, `question_id`, `answer_index`
(then `correct` is reported too) and `meta` (kept as it is). A processed record of a split is one too.
"""
from __future__ import annotations

import json
import math
import os
import string
from pathlib import Path

from .config import Settings
from .data.custom import OPTIONAL, REQUIRED
from .data.prompts import candidate_texts, templates
from .data.records import choice_problem, image_problem
from .errors import UserError

# The custom format's fields, and `answer`: a processed record (data/records.py) is a question too.
FIELDS = REQUIRED + OPTIONAL + ("answer",)


def template_has_options(dataset: str) -> bool:
    """Whether the dataset's prompt template shows the choices (an `{options}` field)."""
    prompt = (templates().get(dataset) or {}).get("prompt", "")
    return any(field == "options" for _, field, _, _ in string.Formatter().parse(prompt) if field is not None)


def question_problem(row: dict, image_root: Path | None) -> str | None:
    """What is wrong with one question (see the module's docstring), or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    unknown = [k for k in row if k not in FIELDS]
    if unknown:
        return f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(FIELDS)})"
    question, choices = row.get("question"), row.get("choices")
    if not isinstance(question, str) or not question.strip():
        return "empty or missing question"
    if not isinstance(row.get("context") or "", str):
        return "context must be a string"
    if not isinstance(row.get("meta") or {}, dict):
        return "meta must be an object"
    if choices:
        answer = row.get("answer_index")
        problem = choice_problem(question, choices, 0 if answer is None else answer)
        if problem:
            return problem
    elif choices is not None and choices != []:
        return f"choices must be a list of strings, got {choices!r}"
    elif row.get("answer_index") is not None:
        return "answer_index without choices"
    image = row.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            return "image must be a path string or null"
        return image_problem(_image_path(image, image_root))
    return None


def _image_path(image: str, image_root: Path | None) -> Path:
    path = Path(image).expanduser()
    return path if path.is_absolute() else Path(image_root or ".") / path


def _probabilities(scores: list[float]) -> list[float]:
    """Each candidate's share among the choices: softmax of minus the summed cross-entropies."""
    low = min(scores)
    weights = [math.exp(low - s) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


def check_questions(rows: list[dict], dataset: str, image_root: Path | None = None,
                    where=lambda i: f"question {i + 1}") -> None:
    """A UserError naming the first bad question (`where(i)` says which), before anything runs."""
    for i, row in enumerate(rows):
        problem = question_problem(row, image_root)
        if problem is None and row.get("choices") and not template_has_options(dataset):
            problem = (f"choices given, but the {dataset} prompt template (params/data.yaml: templates.{dataset}"
                       ".prompt) has no {options} to show them; leave the choices out for a free answer")
        if problem:
            raise UserError(f"{where(i)}: {problem}" if where else problem)


def finished_source(source) -> tuple[Path, dict]:
    """The local folder of `source` (downloaded if a hub repo id) and its run.json; a UserError when it is
    not a finished run, before any model is loaded."""
    from .artifacts import RunDir
    from .hf_hub import fetch

    run = RunDir(fetch(source))
    return run.path, run.finished_run_info()


class Predictor:
    """A fine-tuned model loaded once (load_finetuned), asked any number of questions."""

    def __init__(self, source, device: str | None = None):
        import torch

        from .finetuned import load_finetuned
        from .lora import base_model
        from .model import family_of

        self.source = source
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.processor, self.info = load_finetuned(source, self.device)
        self.dataset = self.info["dataset"]
        self.family = family_of(base_model(self.model))
        # The run's own evaluation settings, on every question given (max_eval_samples only trims splits).
        # The model is in the run's dtypes; evaluate() computes under the run's autocast, as its evaluation did.
        self.settings = Settings(self.info["settings"], max_eval_samples=None)

    def ask_many(self, rows: list[dict], image_root: Path | None = None, progress: bool = False) -> list[dict]:
        """One prediction per question, in order. Image paths are relative to `image_root` (or absolute)."""
        from .evaluate import evaluate

        rows = list(rows)
        check_questions(rows, self.dataset, image_root)
        records = [self._record(i, row, image_root) for i, row in enumerate(rows)]
        out: list[dict | None] = [None] * len(rows)
        for mode in ("rank", "generate"):
            idx = [i for i, r in enumerate(records) if bool(r["choices"]) == (mode == "rank")]
            if not idx:
                continue
            result = evaluate(self.model, self.processor, [records[i] for i in idx], Path("/"), self.dataset,
                              Settings(self.settings, eval_mode=mode), self.family, progress=progress)
            for i, pred in zip(idx, result.predictions):
                out[i] = self._row(rows[i], records[i], pred, mode)
        return out

    def ask(self, question: str, choices: list[str] | None = None, image: str | os.PathLike | None = None,
            context: str = "") -> dict:
        """One question: its choices ranked (`predicted`, `scores`, `probabilities`), or a free `generated`
        answer when there are none."""
        row = {"question": question, "choices": list(choices or []), "context": context or "",
               "image": None if image is None else os.fspath(image)}
        return self.ask_many([row], Path.cwd())[0]

    @staticmethod
    def _record(i: int, row: dict, image_root: Path | None) -> dict:
        image = row.get("image")
        return {"question_id": str(row.get("question_id") or f"question-{i + 1}"),
                "image": None if image is None else str(_image_path(image, image_root).resolve()),
                "question": row["question"], "choices": list(row.get("choices") or []),
                "answer_index": row.get("answer_index"), "context": row.get("context") or "",
                "meta": dict(row.get("meta") or {})}

    @staticmethod
    def _row(row: dict, record: dict, pred: dict, mode: str) -> dict:
        out = {"question_id": record["question_id"], "image": row.get("image"), "question": row["question"],
               "choices": record["choices"], "context": record["context"]}
        if mode == "rank":
            i = pred["predicted"]
            out.update(predicted=i, predicted_answer=candidate_texts(record)[i],
                       scores=pred["scores"], probabilities=_probabilities(pred["scores"]))
        else:
            out["generated"] = pred["generated"]
        if row.get("answer_index") is not None and mode == "rank":
            out.update(answer_index=row["answer_index"], correct=pred["predicted"] == row["answer_index"])
        if row.get("meta"):
            out["meta"] = row["meta"]
        return out


def predict(source, question: str, choices: list[str] | None = None, image: str | os.PathLike | None = None,
            context: str = "", device: str | None = None) -> dict:
    """One question to the fine-tuned model `source` (see Predictor.ask). The run, the question and the
    image are checked before the model loads."""
    row = {"question": question, "choices": list(choices or []), "context": context or "",
           "image": None if image is None else os.fspath(image)}
    folder, info = finished_source(source)
    check_questions([row], info["dataset"], Path.cwd(), where=None)
    return Predictor(folder, device).ask(question, choices, image, context)


def read_questions(path: str | os.PathLike) -> list[dict]:
    """The questions of a JSONL file (custom format, answer and choices optional), checked line by line:
    a bad one is a UserError naming the file, the line and the problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: questions file not found")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e})") from None
        problem = question_problem(row, path.parent)
        if problem:
            raise UserError(f"{path}:{lineno}: {problem}")
        rows.append(dict(row, question_id=str(row.get("question_id") or f"line-{lineno}")))
    if not rows:
        raise UserError(f"{path}: no questions in the file")
    return rows


def default_output(input_path: str | os.PathLike) -> Path:
    """questions.jsonl -> questions.predictions.jsonl, beside it."""
    p = Path(input_path)
    return p.with_name(f"{p.stem}.predictions.jsonl")


def predict_file(source, input_path, output_path=None, device: str | None = None,
                 progress: bool = True) -> tuple[Path, list[dict]]:
    """Predict every question of `input_path` (JSONL; image paths relative to its folder) and write one
    prediction per line to `output_path` (default: beside it, .predictions.jsonl), atomically."""
    from .io import write_jsonl

    input_path = Path(input_path)
    output_path = Path(output_path) if output_path else default_output(input_path)
    if output_path.resolve() == input_path.resolve():
        raise UserError(f"{output_path}: the output would overwrite the questions file; choose another --output")
    rows = read_questions(input_path)
    folder, info = finished_source(source)
    check_questions(rows, info["dataset"], input_path.parent,
                    where=lambda i: f"{input_path}: question '{rows[i]['question_id']}'")
    predictions = Predictor(folder, device).ask_many(rows, input_path.parent, progress=progress)
    write_jsonl(output_path, predictions)
    return output_path, predictions
