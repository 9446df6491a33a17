"""The training loop, in one place: FT, LoRA and DoRA differ only in which parameters train.

Reading order: ``train`` builds everything (data, model, adapters, optimizer, schedule),
resumes if asked, then runs ``training_step`` once per step and saves checkpoints.
Under torchrun the same loop runs on every rank; ``distributed`` holds what differs
(this rank's share of each batch, DDP/FSDP2, rank 0 writing the gathered checkpoint).
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

from wdanalysis.errors import WDAnalysisError
from wdanalysis.storage.atomic_write import write_text_atomic
from wdanalysis.train import checkpoint as ckpt
from wdanalysis.train import distributed, sharded_load
from wdanalysis.train.config import TrainConfig
from wdanalysis.train.data import (
    CLASSIFICATION,
    Dataset,
    batch_indices,
    collate,
    load_dataset,
    logits_of,
)
from wdanalysis.train.decay_record import ShrinkTracker, restore_shrink, write_shrink
from wdanalysis.train.diagnostics import decay_dose, lr_factor
from wdanalysis.train.distributed import World
from wdanalysis.train.inject import (
    AdapterSpec,
    inject_adapters,
    norm_modules,
    select_full_finetune,
    unfreeze_biases,
)
from wdanalysis.train.layers import is_norm
from wdanalysis.train.model import head_modules, load_pretrained
from wdanalysis.train.peft_format import ADAPTER_SUFFIXES, adapter_updates, save_adapter

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
    "fsdp",
    "decay_dose",  # follows max_steps
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
    decay_dose: dict  # :func:`wdanalysis.train.diagnostics.decay_dose`, also in train_config.json
    model: nn.Module = field(repr=False)
    tokenizer: object = field(repr=False)
    data: Dataset = field(repr=False)
    device: torch.device = field(repr=False, default=torch.device("cpu"))
    world: World = field(repr=False, default_factory=World)


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
    ``on_checkpoint(step, model)`` runs after each checkpoint is saved (e.g. an evaluation),
    on every rank under torchrun.
    ``on_step(step, model)`` runs once before the first step (with the step training starts
    from) and after every optimizer step (e.g. :meth:`wdanalysis.tracking.tracker.Tracker.hook`).
    """
    config.validate()
    world = distributed.join(config.device, config.fsdp, config.batch_size)
    data = load_dataset(config.data, config.eval_data)
    task = config.task or data.kind
    torch.manual_seed(config.seed)  # the same fresh head for every method
    from_files = model is None
    if from_files:  # under --fsdp the stored weights stay on meta until sharded
        labels = config.num_labels or data.num_labels
        model, tokenizer = load_pretrained(config.model_dir, task, labels, empty=world.fsdp)
    torch.manual_seed(config.seed + 1)  # the same adapter init whatever happened before
    spec = prepare_parameters(model, config, task)
    model = distributed.wrap(model, world)  # DDP, or FSDP2 shards
    if from_files and world.fsdp:  # each rank reads its rows; DoRA's m from the real rows
        sharded_load.materialise(model, config.model_dir, world.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = parameter_groups(model, config.weight_decay)
    dose = decay_dose(model, groups, config.lr, config.warmup_steps, config.max_steps)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0)
    scheduler = linear_schedule(optimizer, config.warmup_steps, config.max_steps)
    shrink = ShrinkTracker(distributed.unwrap(model), groups)  # decay_shrink.json
    if hasattr(on_step, "use_shrink"):  # a live tracker: its delta_m_learned (issue 36)
        on_step.use_shrink(shrink)
    torch.manual_seed(distributed.rank_seed(config.seed + 2, world))  # dropout stream

    run_dir = distributed.on_main(
        world, lambda: prepare_run_dir(Path(config.out_dir), config, dose)
    )
    start, history = 0, []
    last = distributed.on_main(world, lambda: last_checkpoint(run_dir, config))
    if last is not None:
        start, history = restore(model, optimizer, scheduler, config, last, world)
        restore_shrink(shrink, optimizer, config.warmup_steps, config.max_steps, config.lr, last)

    def adapter_part(name: str, param: nn.Parameter) -> bool:  # what an adapter file holds
        return param.requires_grad or name.endswith(ADAPTER_SUFFIXES)

    only = None if spec is None else adapter_part  # FT checkpoints hold every weight

    def save(step: int) -> None:
        state = distributed.gather_state(model, optimizer, world, only)  # every rank
        args = (distributed.unwrap(model), spec, config, task, state, scheduler, step, history)
        args += (shrink.record(optimizer),)
        distributed.on_main(world, lambda: write_checkpoint(run_dir, *args))  # rank 0 writes

    save_at = set(config.checkpoint_steps())
    if last is None and 0 in save_at:
        save(0)
    if on_step is not None:
        on_step(start, distributed.unwrap(model))
    model.train()
    bar = tqdm(
        range(start, config.max_steps),
        disable=not (config.progress and world.is_main),
        desc=f"train {config.method}",
        unit="step",
        initial=start,
        total=config.max_steps,
    )
    seconds = 0.0
    for step in bar:
        tick = time.perf_counter()
        indices = batch_indices(len(data.train), config.batch_size, step, config.seed)
        records = [data.train[i] for i in distributed.shard(indices, world)]
        batch = collate(records, tokenizer, task, config.max_length)
        shrink.before_update(optimizer)  # the factor AdamW applies in this update
        rate = optimizer.param_groups[0]["lr"]  # logged as the HF Trainer does: this update's
        loss = training_step(model, batch, task, world, optimizer, scheduler, config.max_grad_norm)
        seconds += time.perf_counter() - tick
        history.append({"step": step + 1, "loss": loss, "learning_rate": rate})
        bar.set_postfix(loss=f"{loss:.4f}")
        if on_step is not None:
            on_step(step + 1, distributed.unwrap(model))
        if step + 1 in save_at:
            save(step + 1)
            if on_checkpoint is not None:
                on_checkpoint(step + 1, distributed.unwrap(model))
    steps_run = config.max_steps - start
    return RunResult(
        run_dir=run_dir,
        method=config.method,
        checkpoints=dict(ckpt.list_checkpoints(run_dir)),
        losses=[(h["step"], h["loss"]) for h in history],
        seconds_per_step=seconds / steps_run if steps_run else float("nan"),
        trainable_parameters=sum(p.numel() for p in trainable),
        decay_dose=dose,
        model=distributed.unwrap(model),
        tokenizer=tokenizer,
        data=data,
        device=world.device,
        world=world,
    )


def training_step(model, batch, task, world, optimizer, scheduler, max_grad_norm) -> float:
    """One optimizer update on this rank's share of the batch; returns the global-batch loss.

    bf16 autocast on CUDA, plain float32 on CPU.
    """
    batch = {k: v.to(world.device) for k, v in batch.items()}
    labels = batch.pop("labels")
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if world.device.type == "cuda"
        else contextlib.nullcontext()
    )
    with autocast:
        logits = logits_of(model(**batch))
    total, count = summed_loss(logits.float(), labels, task)
    # Sum and count over the whole global batch; ranks' shards may hold different numbers
    # of response tokens. DDP and FSDP average gradients over ranks, hence the * size:
    # the gradient is exactly that of the global-batch mean, as in one process.
    sums = distributed.all_sum(torch.stack([total.detach(), count]), world)
    loss = total * world.size / sums[1]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    return (sums[0] / sums[1]).item()


def summed_loss(
    logits: torch.Tensor, labels: torch.Tensor, task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of terms) on class labels or on response tokens."""
    if task == CLASSIFICATION:
        total = F.cross_entropy(logits, labels, reduction="sum")
        return total, torch.tensor(float(labels.numel()), device=logits.device)
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shifted, targets, ignore_index=-100, reduction="sum")
    return total, (targets != -100).sum().to(logits.dtype)


def compute_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Mean cross-entropy on class labels, or next-token cross-entropy on response tokens."""
    total, count = summed_loss(logits, labels, task)
    return total / count


def prepare_parameters(model: nn.Module, config: TrainConfig, task: str) -> AdapterSpec | None:
    """Inject adapters (lora/dora) or choose trained weights (ft); the head always trains."""
    heads = head_modules(model) if task == CLASSIFICATION else []
    to_save = tuple(config.modules_to_save if config.modules_to_save is not None else heads)
    if config.train_layernorm:  # the DoRA authors' --unfreeze_layer_norms, saved whole
        to_save += tuple(name for name in norm_modules(model) if name not in to_save)
    if config.method == "ft":
        if config.ft_modules:
            select_full_finetune(model, tuple(config.ft_modules) + to_save)
        else:
            select_full_finetune(model)
        if config.train_bias:
            unfreeze_biases(model)
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
        bias="all" if config.train_bias else "none",
    )
    inject_adapters(model, spec)
    if config.train_bias:  # the DoRA authors' --unfreeze_bias; PEFT's bias="all"
        unfreeze_biases(model)
    return spec


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weights, none on biases and normalisation layers.

    The convention of BERT, of the HF Trainer and of the DoRA authors' VL-T5 code (no decay
    on ``bias`` and ``LayerNorm.weight``). Adapter factors and DoRA magnitudes are decayed,
    as they are there.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        norm = is_norm(module)
        for name, param in module.named_parameters(recurse=False):
            if norm or name == "bias":
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

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, max_steps)
    )


def prepare_run_dir(run_dir: Path, config: TrainConfig, dose: dict | None = None) -> Path:
    """Create the run folder; refuse to mix two different runs in one folder.

    ``train_config.json`` holds the settings plus ``decay_dose``, what the weight decay
    applies to each parameter group over the schedule.
    """
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
    written = config.to_json() | ({} if dose is None else {"decay_dose": dose})
    write_text_atomic(record, json.dumps(written, indent=2) + "\n")
    return run_dir


def write_checkpoint(
    run_dir, model, spec, config, task, state, scheduler, step, history, shrink=None
):
    """``checkpoint-<step>/``, written whole or not at all (on rank 0 only under torchrun).

    ``state`` holds the full model weights, the optimizer state and every rank's RNG
    state, gathered from all ranks beforehand (``distributed.gather_state``). ``shrink``:
    the decay record of :class:`~wdanalysis.train.decay_record.ShrinkTracker`, written as
    ``decay_shrink.json``.
    """

    def fill(folder: Path) -> None:
        if spec is None:
            ckpt.save_full_weights(model, folder, state["weights"])
        else:
            save_adapter(model, spec, folder, str(config.model_dir), task, state["weights"])
        ckpt.save_training_state(folder, state["optimizer"], scheduler, step, state["rng"])
        ckpt.write_trainer_state(folder, step, config.max_steps, history)
        if shrink is not None:
            write_shrink(folder, shrink)

    ckpt.write_checkpoint(run_dir, step, fill)
    if not config.keep_all_training_states:  # optimizer state is 2x the model: keep one
        ckpt.drop_older_training_states(run_dir, step)


def last_checkpoint(run_dir: Path, config: TrainConfig) -> tuple[int, Path] | None:
    """The checkpoint to resume from (``--resume``), if the run folder holds one."""
    found = ckpt.list_checkpoints(run_dir) if config.resume else []
    if not found:
        return None
    step, folder = found[-1]
    if step > config.max_steps:
        raise WDAnalysisError(f"run is already past max_steps ({step})", path=folder)
    return step, folder


def restore(model, optimizer, scheduler, config, last, world) -> tuple[int, list[dict]]:
    """Load the last complete checkpoint: weights, optimizer, schedule, RNG, loss log.

    Under torchrun every rank reads it, so the run folder must be on a shared filesystem.
    """
    step, folder = last
    if not folder.is_dir():
        raise WDAnalysisError(
            f"rank {world.rank} cannot see the checkpoint to resume from",
            path=folder,
            hint="put --out on a filesystem every node mounts",
        )
    if config.method == "ft":
        weights = ckpt.read_full_weights(folder)
    else:
        weights = adapter_updates(distributed.unwrap(model), folder)
    distributed.load_model_state(model, weights, world, strict=config.method == "ft")
    state = ckpt.load_training_state(folder)
    distributed.load_optimizer_state(model, optimizer, state["optimizer"], world)
    scheduler.load_state_dict(state["scheduler"])
    distributed.restore_rng(state, world)
    history = ckpt.read_trainer_state(folder).get("log_history", [])
    return step, [h for h in history if h["step"] <= step]
