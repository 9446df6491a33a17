"""Train LoRA, DoRA, PiSSA, VeRA, LoHa, OFT and IA³ with the real ``peft`` library, alike:
the demo's main cell (``DemoSettings()``) for every method (issue 36, item 4).

Every method gets the bundled trainer's pieces unchanged: the same model and head init
(seed), the same batches (``batch_indices``/``collate``), the same ``training_step`` (loss,
clip 5), AdamW with the trainer's ``parameter_groups`` (decay on weights, none on biases
and LayerNorms), the same warm-up + linear schedule, lr 1e-3 and the weight decay of the
paper's adapter dose 0.5 (``DemoSettings.weight_decay_for("lora")``), biases and LayerNorms
trained beside the adapter, query/value targets, rank 64 where a method has a rank. Only
the adapter differs: it is PEFT's (``get_peft_model``), saved by ``save_pretrained``.

Each checkpoint (steps 125, 250, 375, 500) gets ``decay_shrink.json`` as the trainer
writes it (``ShrinkTracker``: the exact Π(1 − lr·wd) per AdamW group), its parameter names
given as the keys the adapter file stores, so ``wdanalysis compare`` finds each tensor's S.

Resumable per method: ``OUT/<method>/done.json`` marks a finished run; several processes
share the methods by exclusive claim files (``OUT/<method>.claim``, removed on failure).
Checkpoints are written to a temporary folder and renamed.

    OMP_NUM_THREADS=1 nice -n 5 python scripts/peft_methods_train.py runs/peft_methods
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from wdanalysis.demo.reproduction import MODULES, DemoSettings, model_path
from wdanalysis.storage.atomic_write import write_text_atomic
from wdanalysis.train.data import (
    batch_indices,
    builtin_tweets,
    collate,
    evaluate_accuracy,
    load_dataset,
)
from wdanalysis.train.decay_record import ShrinkTracker, write_shrink
from wdanalysis.train.distributed import World
from wdanalysis.train.inject import norm_modules, unfreeze_biases
from wdanalysis.train.loop import linear_schedule, parameter_groups, training_step
from wdanalysis.train.model import head_modules, load_pretrained

METHODS = ("lora", "dora", "pissa", "vera", "loha", "oft", "ia3")
DONE = "done.json"


def peft_config(method: str, settings: DemoSettings, heads: list[str]):
    """PEFT's config of ``method``: query/value, the head saved whole, rank 64 where any."""
    import peft

    common = {"target_modules": list(MODULES), "modules_to_save": heads}
    r, alpha = settings.rank, settings.lora_alpha
    if method in ("lora", "dora", "pissa"):
        init = "pissa" if method == "pissa" else True
        return peft.LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=0.0, use_dora=method == "dora",
            init_lora_weights=init, **common,
        )  # fmt: skip
    if method == "vera":
        return peft.VeraConfig(r=r, vera_dropout=0.0, **common)
    if method == "loha":
        return peft.LoHaConfig(r=r, alpha=alpha, **common)
    if method == "oft":
        return peft.OFTConfig(oft_block_size=32, r=0, **common)
    if method == "ia3":
        return peft.IA3Config(feedforward_modules=[], **common)
    raise ValueError(f"unknown method {method!r}")


def file_names(model) -> dict[int, str]:
    """Parameter storage → the key ``save_pretrained`` stores it under (adapter tensors)."""
    from peft import get_peft_model_state_dict

    by_ptr = {(p.data_ptr(), tuple(p.shape)): name for name, p in model.named_parameters()}
    names: dict[int, str] = {}
    for key, tensor in get_peft_model_state_dict(model).items():
        name = by_ptr.get((tensor.data_ptr(), tuple(tensor.shape)))
        if name is not None:
            names[id(model.get_parameter(name))] = key
    return names


def build(method: str, settings: DemoSettings):
    """(model, tokenizer, groups, names) with the trainer's seeds and parameter choices."""
    from peft import get_peft_model

    torch.manual_seed(settings.seed)  # the same fresh head as the bundled trainer
    model, tokenizer = load_pretrained(model_path(), "classification", 2)
    heads = head_modules(model)
    norms = norm_modules(model)
    torch.manual_seed(settings.seed + 1)  # the adapter init
    model = get_peft_model(model, peft_config(method, settings, heads))
    unfreeze_biases(model)  # the DoRA authors' --unfreeze_bias
    for name, module in model.named_modules():  # --unfreeze_layer_norms
        if any(name.endswith(n) for n in norms):
            for p in module.parameters():
                p.requires_grad_(True)
    groups = parameter_groups(model, settings.weight_decay_for("lora"))
    names = file_names(model)
    return model, tokenizer, groups, names


def save(run_dir: Path, step: int, model, record: dict, history: list) -> None:
    """``checkpoint-<step>/``: PEFT's adapter files and the decay record, whole or not at all."""
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    write_shrink(tmp, record)
    state = {"global_step": step, "log_history": history}
    write_text_atomic(tmp / "trainer_state.json", json.dumps(state) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def train_method(out: Path, method: str, settings: DemoSettings) -> dict:
    run_dir = out / method
    shutil.rmtree(run_dir, ignore_errors=True)  # a run cut short starts afresh
    run_dir.mkdir(parents=True)
    data = load_dataset("builtin:tweets")
    model, tokenizer, groups, names = build(method, settings)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr_lora, weight_decay=0.0)
    scheduler = linear_schedule(optimizer, settings.warmup_steps(), settings.steps)
    shrink = ShrinkTracker(model, groups)
    # the record names each tensor as the adapter file does (compare's lookup key)
    shrink.names = [[names.get(id(p), n) for p, n in zip(g["params"], ns, strict=True)]
                    for g, ns in zip(groups, shrink.names, strict=True)]  # fmt: skip
    torch.manual_seed(settings.seed + 2)  # dropout stream
    world, history, started = World(), [], time.perf_counter()
    cpu_start = time.process_time()
    save_at = set(settings.save_steps())
    model.train()
    for step in range(settings.steps):
        indices = batch_indices(len(data.train), settings.batch_size, step, settings.seed)
        batch = collate([data.train[i] for i in indices], tokenizer, data.kind,
                        settings.max_length)  # fmt: skip
        shrink.before_update(optimizer)
        rate = optimizer.param_groups[0]["lr"]
        loss = training_step(model, batch, data.kind, world, optimizer, scheduler,
                             settings.max_grad_norm)  # fmt: skip
        history.append({"step": step + 1, "loss": loss, "learning_rate": rate})
        if step + 1 in save_at:
            save(run_dir, step + 1, model, shrink.record(optimizer), history)
        if (step + 1) % 25 == 0:  # how far a run got, and its CPU time (the machine is shared)
            progress = {"step": step + 1, "cpu_seconds": time.process_time() - cpu_start,
                        "wall_seconds": time.perf_counter() - started}  # fmt: skip
            write_text_atomic(run_dir / "progress.json", json.dumps(progress) + "\n")
    seconds = time.perf_counter() - started
    held_out = builtin_tweets().eval[: settings.eval_size]
    accuracy = evaluate_accuracy(model, tokenizer, held_out, max_length=settings.max_length)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    adapter = sum(p.numel() for g in groups for p in g["params"] if id(p) in names)
    record = {
        "method": method,
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_start,
        "accuracy": accuracy,
        "final_loss": history[-1]["loss"],
        "trainable_parameters": trainable,
        "adapter_parameters": adapter,
        "weight_decay": settings.weight_decay_for("lora"),
        "shrink": shrink.record(optimizer)["groups"][0]["shrink"],
    }
    write_text_atomic(run_dir / DONE, json.dumps(record, indent=1) + "\n")
    return record


def claim(out: Path, method: str) -> bool:
    try:
        fd = os.open(out / f"{method}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=None, help="a quick smoke run only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings() if args.steps is None else DemoSettings(steps=args.steps)
    for method in args.methods:
        if (args.out / method / DONE).is_file() or not claim(args.out, method):
            continue
        try:
            record = train_method(args.out, method, settings)
        except BaseException:
            (args.out / f"{method}.claim").unlink(missing_ok=True)
            raise
        print(f"{method}: {record['seconds'] / 60:.1f} min, accuracy {record['accuracy']:.3f}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
