"""What a training run is: one dataclass shared by the Python API and the CLI."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wdanalysis.errors import WDAnalysisError

METHODS = ("ft", "lora", "dora")
DEFAULT_LR = {"ft": 5e-5, "lora": 1e-3, "dora": 1e-3}


@dataclass
class TrainConfig:
    """Every method gets the same data order and schedule for the same seed.

    ``save_steps`` (explicit list) and ``save_every`` (every N steps) may be combined; the
    final step is always saved. Step 0 may be listed to save the untrained state.
    """

    method: str
    model_dir: str | Path
    out_dir: str | Path
    data: str = "builtin:tweets"
    eval_data: str | None = None
    task: str | None = None  # "classification" or "causal-lm"; default: from the data
    num_labels: int | None = None
    max_steps: int = 150
    batch_size: int = 16
    max_length: int = 64
    learning_rate: float | None = None  # default per method, see DEFAULT_LR
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    save_steps: Sequence[int] = ()
    save_every: int | None = None
    r: int = 8
    lora_alpha: float = 16.0
    use_rslora: bool = False
    lora_dropout: float = 0.0
    target_modules: Sequence[str] = ("query", "value")
    magnitude_only_modules: Sequence[str] = ()
    modules_to_save: Sequence[str] | None = None  # default: the classification head
    ft_modules: Sequence[str] = ()  # ft: train only these modules (plus the head); () = all
    detach_norm: bool = True  # DoRA Sec. 4.3
    # Beside the adapters (or ft_modules), as the DoRA authors' --unfreeze_bias and
    # --unfreeze_layer_norms: every bias (never decayed) / every normalisation layer
    # (never decayed, saved whole like a head).
    train_bias: bool = False
    train_layernorm: bool = False
    device: str = "auto"  # "cpu", "cuda" or "auto"
    fsdp: bool = False  # under torchrun: shard with FSDP2 instead of DDP
    resume: bool = False
    keep_all_training_states: bool = False  # resume needs only the newest checkpoint's
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form, recorded in the run folder

    def validate(self) -> None:
        if self.method not in METHODS:
            raise WDAnalysisError(f"unknown method {self.method!r}", hint="use ft, lora or dora")
        for name in ("max_steps", "batch_size", "max_length", "r"):
            if getattr(self, name) <= 0:
                raise WDAnalysisError(f"{name} must be positive, got {getattr(self, name)}")
        if self.save_every is not None and self.save_every <= 0:
            raise WDAnalysisError("save_every must be positive")
        if any(s < 0 or s > self.max_steps for s in self.save_steps):
            raise WDAnalysisError(f"save steps must lie in 0..{self.max_steps}")
        if not 0 <= self.lora_dropout < 1:
            raise WDAnalysisError("lora_dropout must lie in [0, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise WDAnalysisError(f"unknown device {self.device!r}", hint="cpu, cuda or auto")
        if self.method == "dora" or not self.magnitude_only_modules:
            return
        raise WDAnalysisError("magnitude-only modules are a DoRA option", hint="--method dora")

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]

    def checkpoint_steps(self) -> list[int]:
        steps = set(self.save_steps) | {self.max_steps}
        if self.save_every:
            steps |= set(range(self.save_every, self.max_steps + 1, self.save_every))
        return sorted(steps)

    def to_json(self) -> dict:
        record = dataclasses.asdict(self)
        for key, value in record.items():
            if isinstance(value, Path):
                record[key] = str(value)
            elif isinstance(value, tuple):
                record[key] = list(value)
        return record
