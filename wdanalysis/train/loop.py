"""The training loop, in one place: FT, LoRA and DoRA differ only in which parameters train.

Reading order: ``train`` builds everything (data, model, adapters, optimizer, schedule),
resumes if asked, then runs ``training_step`` once per step and saves checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from wdanalysis.atomic import write_text_atomic
from wdanalysis.errors import WDAnalysisError
from wdanalysis.train import checkpoint as ckpt
from wdanalysis.train.config import TrainConfig
from wdanalysis.train.data import (
    CLASSIFICATION,
    Dataset,
    batch_indices,
    collate,
    load_dataset,
    logits_of,
)
from wdanalysis.train.inject import AdapterSpec, inject_adapters, select_full_finetune
from wdanalysis.train.model import head_modules, load_pretrained
from wdanalysis.train.peft_format import load_adapter, save_adapter

RUN_CONFIG = "train_config.json"
# Settings a resumed run may change; everything else must match the original run.
RESUMABLE_CHANGES = {
    "resume",
    "progress",
    "max_steps",
    "save_steps",
    "save_every",
    "device",
    "keep_all_training_states",
}


@dataclass
class RunResult:
    """What a finished (or resumed-and-finished) run produced."""

    run_dir: Path
    method: str
    checkpoints: dict[int, Path]  # step -> folder, every complete checkpoint of the run
    losses: list[tuple[int, float]]  # (step, training loss), steps 1..max_steps
    seconds_per_step: float  # this process's steps only, checkpoint writes excluded
    trainable_parameters: int
    model: nn.Module = field(repr=False)
    tokenizer: object = field(repr=False)
    data: Dataset = field(repr=False)
    device: torch.device = field(repr=False, default=torch.device("cpu"))


def train(
    config: TrainConfig,
    model: nn.Module | None = None,
    tokenizer=None,
    on_checkpoint: Callable[[int, nn.Module], None] | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> RunResult:
    """Train ``config.method`` and save checkpoints into ``config.out_dir``.

    ``model``/``tokenizer`` may be given for a model not loadable with ``transformers``;
    ``config.model_dir`` is then only recorded as ``base_model_name_or_path``.
    ``on_checkpoint(step, model)`` runs after each checkpoint is saved (e.g. an evaluation).
    ``on_step(step, model)`` runs once before the first step (with the step training starts
    from) and after every optimizer step (e.g. :meth:`wdanalysis.tracking.Tracker.hook`).
    """
    config.validate()
    device = resolve_device(config.device)
    data = load_dataset(config.data, config.eval_data)
    task = config.task or data.kind
    torch.manual_seed(config.seed)  # the same fresh head for every method
    if model is None:
        model, tokenizer = load_pretrained(
            config.model_dir, task, config.num_labels or data.num_labels
        )
    torch.manual_seed(config.seed + 1)  # the same adapter init whatever happened before
    spec = prepare_parameters(model, config, task)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, weight_decay=0.0
    )
    scheduler = linear_schedule(optimizer, config.warmup_steps, config.max_steps)
    torch.manual_seed(config.seed + 2)  # dropout stream

    run_dir = prepare_run_dir(Path(config.out_dir), config)
    start, history = 0, []
    if config.resume and ckpt.list_checkpoints(run_dir):
        start, history = restore(model, optimizer, scheduler, config, run_dir)

    def save(step: int) -> None:
        ckpt.write_checkpoint(
            run_dir,
            step,
            lambda folder: fill_checkpoint(
                folder, model, spec, config, task, optimizer, scheduler, step, history
            ),
        )
        if not config.keep_all_training_states:  # optimizer state is 2x the model: keep one
            ckpt.drop_older_training_states(run_dir, step)

    save_at = set(config.checkpoint_steps())
    if start == 0 and 0 in save_at and not (run_dir / "checkpoint-0").exists():
        save(0)
    if on_step is not None:
        on_step(start, model)
    model.train()
    bar = tqdm(
        range(start, config.max_steps),
        disable=not config.progress,
        desc=f"train {config.method}",
        unit="step",
        initial=start,
        total=config.max_steps,
    )
    seconds = 0.0
    for step in bar:
        tick = time.perf_counter()
        records = [
            data.train[i]
            for i in batch_indices(len(data.train), config.batch_size, step, config.seed)
        ]
        batch = collate(records, tokenizer, task, config.max_length)
        loss = training_step(model, batch, task, device, optimizer, scheduler, config.max_grad_norm)
        seconds += time.perf_counter() - tick
        rate = scheduler.get_last_lr()[0]
        history.append({"step": step + 1, "loss": loss, "learning_rate": rate})
        bar.set_postfix(loss=f"{loss:.4f}")
        if on_step is not None:
            on_step(step + 1, model)
        if step + 1 in save_at:
            save(step + 1)
            if on_checkpoint is not None:
                on_checkpoint(step + 1, model)
    steps_run = config.max_steps - start
    return RunResult(
        run_dir=run_dir,
        method=config.method,
        checkpoints=dict(ckpt.list_checkpoints(run_dir)),
        losses=[(h["step"], h["loss"]) for h in history],
        seconds_per_step=seconds / steps_run if steps_run else float("nan"),
        trainable_parameters=sum(p.numel() for p in trainable),
        model=model,
        tokenizer=tokenizer,
        data=data,
        device=device,
    )


def training_step(model, batch, task, device, optimizer, scheduler, max_grad_norm) -> float:
    """One optimizer update; bf16 autocast on CUDA, plain float32 on CPU."""
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch.pop("labels")
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    with autocast:
        logits = logits_of(model(**batch))
    loss = compute_loss(logits.float(), labels, task)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    return loss.item()


def compute_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Cross-entropy on class labels, or next-token cross-entropy on response tokens."""
    if task == CLASSIFICATION:
        return F.cross_entropy(logits, labels)
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)


def prepare_parameters(model: nn.Module, config: TrainConfig, task: str) -> AdapterSpec | None:
    """Inject adapters (lora/dora) or choose trained weights (ft); the head always trains."""
    heads = head_modules(model) if task == CLASSIFICATION else []
    to_save = tuple(config.modules_to_save if config.modules_to_save is not None else heads)
    if config.method == "ft":
        if config.ft_modules:
            select_full_finetune(model, tuple(config.ft_modules) + to_save)
        else:
            select_full_finetune(model)
        return None
    spec = AdapterSpec(
        method=config.method,
        r=config.r,
        alpha=config.lora_alpha,
        use_rslora=config.use_rslora,
        dropout=config.lora_dropout,
        target_modules=tuple(config.target_modules),
        magnitude_only_modules=tuple(config.magnitude_only_modules),
        modules_to_save=to_save,
        detach_norm=config.detach_norm,
    )
    inject_adapters(model, spec)
    return spec


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weights, none on biases and normalisation layers.

    The convention of BERT, of the HF Trainer and of the DoRA authors' VL-T5 code (no decay
    on ``bias`` and ``LayerNorm.weight``). Adapter factors and DoRA magnitudes are decayed,
    as they are there.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, nn.LayerNorm | nn.GroupNorm) or "Norm" in type(module).__name__
        for name, param in module.named_parameters(recurse=False):
            if is_norm or name == "bias":
                no_decay.add(id(param))
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if id(p) not in no_decay]
    rest = [p for p in trainable if id(p) in no_decay]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return groups


def linear_schedule(optimizer, warmup_steps: int, max_steps: int):
    """Linear warm-up, then linear decay to zero at ``max_steps`` (the HF Trainer default)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise WDAnalysisError("--device cuda but no CUDA GPU is visible", hint="use --device cpu")
    return torch.device(name)


def prepare_run_dir(run_dir: Path, config: TrainConfig) -> Path:
    """Create the run folder; refuse to mix two different runs in one folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.remove_stale_temporaries(run_dir)
    record = run_dir / RUN_CONFIG
    existing = ckpt.list_checkpoints(run_dir)
    if existing and not config.resume:
        raise WDAnalysisError(
            "run folder already holds checkpoints",
            path=run_dir,
            hint="pass --resume to continue it, or choose another --out",
        )
    if existing and record.is_file():
        old = json.loads(record.read_text(encoding="utf-8"))
        new = config.to_json()
        changed = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k])
        if changed:
            raise WDAnalysisError(
                f"cannot resume: settings differ from the run's ({changed})", path=record
            )
    write_text_atomic(record, json.dumps(config.to_json(), indent=2) + "\n")
    return run_dir


def fill_checkpoint(folder, model, spec, config, task, optimizer, scheduler, step, history):
    """Everything one checkpoint holds; called on the temporary folder."""
    if spec is None:
        ckpt.save_full_weights(model, folder)
    else:
        save_adapter(model, spec, folder, str(config.model_dir), task)
    ckpt.save_training_state(folder, optimizer, scheduler, step)
    ckpt.write_trainer_state(folder, step, config.max_steps, history)


def restore(model, optimizer, scheduler, config, run_dir: Path) -> tuple[int, list[dict]]:
    """Load the last complete checkpoint: weights, optimizer, schedule, RNG, loss log."""
    step, folder = ckpt.list_checkpoints(run_dir)[-1]
    if step > config.max_steps:
        raise WDAnalysisError(f"run is already past max_steps ({step})", path=folder)
    if config.method == "ft":
        ckpt.load_full_weights(model, folder)
    else:
        load_adapter(model, folder)
    state = ckpt.load_training_state(folder)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"])
    history = ckpt.read_trainer_state(folder).get("log_history", [])
    return step, [h for h in history if h["step"] <= step]
