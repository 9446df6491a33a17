"""Worker of tests/test_tracking_sharded.py: 2 CPU processes (gloo), FSDP2, the callback.

``python sharded_tracking_worker.py BASE OUT PORT``. Each rank shards a tiny Llama with
FSDP2's ``fully_shard`` per decoder layer and at the root (what accelerate's
``fsdp2_prepare_model`` does; accelerate 1.16 turns FSDP on only for GPU-like devices, so
on CPU the test shards the model itself), then trains 4 steps on its own batches, driving
:class:`WeightDecompositionCallback` as the Trainer does. Three runs:

* ``dora``/``ft``: tracked every 2 steps; at each tracked step the full trainable weights
  (``full_tensor()``) are saved by rank 0 as ``<run>_<step>.pt`` for the unsharded check.
* ``rank1_fails``: rank 1 alone is given a base that does not exist; every rank must stop
  tracking at train begin and train on, none may hang.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

MODULES = ["q_proj", "k_proj"]


def _sharded_model(base: Path, method: str):
    import peft
    import torch
    import transformers
    from torch.distributed.fsdp import fully_shard

    model = transformers.LlamaForCausalLM.from_pretrained(base)
    if method != "ft":
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODULES, use_dora=True)
        model = peft.get_peft_model(model, config)
        with torch.no_grad():  # lora_B starts at zero; move it so that ΔD is not 0 at once
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    layers = model.base_model.model.model.layers if method != "ft" else model.model.layers
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _full_trainables(model) -> dict:
    return {
        name: param.detach().full_tensor()  # collective: every rank
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def _run(rank: int, base: Path, out: Path, name: str, method: str) -> None:
    import torch

    from wdanalysis import WeightDecompositionCallback

    torch.manual_seed(0)
    model = _sharded_model(base, method)
    wrong = name == "rank1_fails" and rank == 1
    callback = WeightDecompositionCallback(
        out / "missing" if wrong else base, every=2, out=out / f"{name}.csv", modules=MODULES
    )
    args = SimpleNamespace(output_dir=str(out / name), report_to=[])
    state = SimpleNamespace(global_step=0, is_world_process_zero=rank == 0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        callback.on_train_begin(args, state, None, model=model)
        for step in range(1, 5):
            ids = torch.randint(0, 64, (2, 8), generator=gen)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            state.global_step = step
            callback.on_step_end(args, state, None, model=model)
            if step % 2 == 0:
                full = _full_trainables(model)
                if rank == 0:
                    torch.save(full, out / f"{name}_{step}.pt")
        callback.on_train_end(args, state, None, model=model)
    said = [str(w.message) for w in seen if "weight tracking" in str(w.message)]
    (out / f"{name}_rank{rank}.log").write_text("\n".join(said) + f"\ntrained {step}\n")


def main(rank: int, base: str, out: str, port: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for name, method in (("dora", "dora"), ("ft", "ft"), ("rank1_fails", "dora")):
            _run(rank, Path(base), Path(out), name, method)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # stdlib spawn, heavy imports inside the ranks: this launcher imports no torch at all
    spawn = multiprocessing.get_context("spawn")
    ranks = [spawn.Process(target=main, args=(r, *sys.argv[1:4])) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join()
    sys.exit(max(abs(p.exitcode or 0) for p in ranks))
