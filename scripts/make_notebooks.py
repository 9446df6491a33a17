"""Write the two notebooks under notebooks/ (the .ipynb files are committed).

Kept as code so that the notebooks' text is reviewed like code. ``--execute`` also runs
``figure2_reproduction.ipynb`` on the committed results in ``figures/`` (seconds: it reads
them, it does not train) and stores its outputs, so a reader sees the figures and tables
without running anything; rerun it when ``figures/`` changes (tests/test_demo.py checks
that the stored outputs show the committed numbers). The template for your own
checkpoints is stored without outputs: it has nothing to show until you give it paths.

    python scripts/make_notebooks.py [--execute]
"""

import argparse
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent.parent / "notebooks"


def parameters(source: str):
    cell = new_code_cell(source)
    cell.metadata["tags"] = ["parameters"]
    return cell


def reproduction() -> nbformat.NotebookNode:
    md, code = new_markdown_cell, new_code_cell
    cells = [
        md(
            "# Reproducing Figure 2 of the DoRA paper on CPU\n\n"
            "Liu et al. (ICML 2024) decompose each weight matrix into a magnitude vector "
            "`m = ‖W‖` (one entry per output feature) and a direction `V/‖V‖`, and ask how "
            "fine-tuning changes each. Per layer and per training step they plot the magnitude "
            "change ΔM against the direction change ΔD. On VL-BART they find a **negative** "
            "slope for full fine-tuning (r = −0.62) and DoRA (r = −0.31) and a **positive** "
            "one for LoRA (r = +0.83).\n\n"
            "The demo trains FT, LoRA and DoRA on all-MiniLM-L6-v2 (a 6-layer BERT shipped by "
            "a PyPI package) for tweet sentiment, on CPU, in the **dose-matched regime**: "
            "AdamW with the weight decay chosen so that the decay dose wd·Σₜ lrₜ equals the "
            "DoRA authors' (0.05 for FT at lr 1e-4; 0.5 for LoRA and DoRA at lr 1e-3: wd 2.0 "
            "over 500 steps), biases and LayerNorms trained beside the adapters, 10 % warm-up "
            "then linear decay, gradient clip 5, r = α = 64 on query and value. It then "
            "analyses the query and value matrices with statistics that respect how the "
            "points were made.\n\n"
            "By default this notebook reads the committed results in `figures/` (seconds); "
            "`TRAIN = True` trains the main job again (about 10 minutes on 2 CPU cores) and "
            "`QUICK = True` runs a 20-step smoke version. The outputs stored with the notebook "
            "come from the committed results (`python scripts/make_notebooks.py --execute`)."
        ),
        parameters(
            "# Parameters (CI runs this notebook with QUICK = True)\n"
            "TRAIN = False  # True: train the main job again instead of reading figures/\n"
            "QUICK = False  # True: a 20-step smoke run (implies training)\n"
            'OUT = "runs/notebook"\n'
            "SEED = 0\n"
            "FIGURES = None  # folder with the committed results (default: the repository's)"
        ),
        code(
            "import warnings\n"
            "from pathlib import Path\n\n"
            "import pandas as pd\n"
            "from IPython.display import Image, display\n\n"
            "warnings.filterwarnings('ignore', message='IProgress not found')  # tqdm in Jupyter\n"
            "import wdanalysis\n"
            "from wdanalysis.demo import DemoSettings, model_path, run_demo\n\n"
            "%matplotlib inline\n"
            "repo = Path(wdanalysis.__file__).parents[1]\n"
            "figures = Path(FIGURES) if FIGURES else repo / 'figures'\n"
            "trained_here = TRAIN or QUICK\n"
            "print('wdanalysis', wdanalysis.__version__, '| results from',\n"
            "      'a run trained here' if trained_here else figures.relative_to(repo))"
        ),
        md(
            "## 1. The main job: FT, LoRA and DoRA, seed 0\n\n"
            "Same data order and schedule for every method; checkpoints at 25/50/75/100 % of "
            "the steps."
        ),
        code(
            "if trained_here:\n"
            "    settings = DemoSettings.quick(SEED) if QUICK else DemoSettings(seed=SEED)\n"
            "    result = run_demo(OUT, settings, progress=False)\n"
            "    deltas, summary = result.deltas, result.summary\n"
            "else:\n"
            "    deltas = wdanalysis.read_table(figures / 'deltas.csv')\n"
            "    summary = pd.read_csv(figures / 'summary.csv')\n"
            "deltas.groupby(['method', 'module']).size().rename('points (layers × steps)')"
        ),
        md(
            "## 2. The verdict, with honest uncertainty\n\n"
            "The points are layers × steps of **one** run, not independent draws. Besides the "
            "pooled r, each row has a 95 % interval from a cluster bootstrap over whole layers, "
            "the *within-step* r (ΔM and ΔD centred per step, so the common growth over "
            "training is removed), the per-step r at the first and last checkpoint, and an "
            "exact permutation test over layers of each method's r against LoRA's. "
            "`m_moved_rel` is how far DoRA's magnitudes moved from their initial norms."
        ),
        code(
            "for row in summary.itertuples():\n"
            "    print(f'{row.method:<4} {row.module:<5} pooled r = {row.pearson_r:+.2f} '\n"
            "          f'[{row.pearson_r_boot_low:+.2f}, {row.pearson_r_boot_high:+.2f}]  '\n"
            "          f'within-step r = {row.within_step_r:+.2f}  paper r = {row.paper_r:+.2f}')\n"
            "columns = ['method', 'module', 'accuracy', 'pearson_r', 'within_step_r',\n"
            "           'r_first_step', 'r_last_step', 'p_vs_lora', 'decay_dose', 'm_moved_rel']\n"
            "summary[columns].round(3)"
        ),
        code(
            "fits = wdanalysis.fit_lines(deltas)\n"
            "fits[fits['scope'] == 'step'][['method', 'module', 'step', 'slope', 'pearson_r']]"
        ),
        code("wdanalysis.layer_permutation_test(deltas, 'DoRA', 'LoRA', 'query')"),
        md("## 3. Figure 2 (query) and Figure 6 (value)"),
        code("wdanalysis.plot_figure2(deltas, module='query', fits=fits)"),
        code("wdanalysis.plot_figure2(deltas, module='value', fits=fits)"),
        md(
            "The trajectory view (not in the paper): how ΔM and ΔD grow with the step, "
            "one line per layer."
        ),
        code("wdanalysis.plot_trajectories(deltas, module='query')"),
        md(
            "## 4. The decay-dose study: what turns the slopes negative?\n\n"
            "Decoupled weight decay shrinks every decayed row by `1 − lrₜ·wd` per update, "
            "whatever the gradient does, and leaves its direction alone: it acts on ΔM, not on "
            "ΔD. `wdanalysis demo --study dose` trains three doses (*today* = wd 0.01, *10×*, "
            "*paper*) × 500 and 2000 steps × FT, LoRA, DoRA, and the main cell (paper dose, "
            "500 steps) over four seeds (0, 1, 2 fixed in advance; 5111 drawn afterwards). The "
            "cells are committed in `figures/dose_study/`; read here, not retrained."
        ),
        code(
            "study = pd.read_csv(figures / 'dose_study.csv')\n"
            "main_seed = study[study['seed'] == 0]\n"
            "main_seed.pivot_table(index=['level', 'steps'], columns=['method', 'module'],\n"
            "                      values='pearson_r').round(2)"
        ),
        code(
            "display(Image(filename=str(figures / 'dose_response.png'), width=720))\n"
            "seeds = pd.read_csv(figures / 'dose_study_seeds.csv')\n"
            "seeds[['level', 'steps', 'method', 'module', 'seeds', 'pearson_r_mean',\n"
            "       'pearson_r_ci_low', 'pearson_r_ci_high', 'within_step_r_mean']].round(2)"
        ),
        md(
            "How much of ΔM is the decay's own shrinkage? `scripts/decay_share.py` divides each "
            "layer's final ΔM by the ΔM the decay alone would give, (1 − shrink)·mean‖w₀ row‖. "
            "A ratio near 1 means the gradient barely moved the magnitudes: wherever FT's or "
            "DoRA's slope is negative, it is."
        ),
        code(
            "share = pd.read_csv(figures / 'dose_decay_share.csv')\n"
            "share.pivot_table(index=['level', 'steps', 'seed'], columns=['method', 'module'],\n"
            "                  values='dm_over_decay_only').round(2)"
        ),
        md(
            "**Reading it.** LoRA keeps its lock-step (r ≈ +1) everywhere. FT's and DoRA's "
            "slopes turn negative only once the dose is ≥ 10× the old demo's, and there ΔM is "
            "the decay's shrinkage (ratio ≈ 1): here a negative slope is the decay's "
            "fingerprint, not evidence that the method learns magnitude and direction apart. "
            "The docs' reproduction report discusses it in full.\n\n"
            "## 5. The previous regime (before the dose study)\n\n"
            "FT at lr 5e-5, weight decay 0.01 for every method, biases and LayerNorms frozen "
            "for LoRA/DoRA: its seed study and its ablation (steps × weight decay × warm-up, "
            "seed 0), committed as `seeds.csv` and `ablation.csv`. No cell of it gives a "
            "negative pooled r for FT or DoRA."
        ),
        code(
            "previous = pd.read_csv(figures / 'seeds.csv')\n"
            "display(previous.pivot_table(index=['method', 'module'], columns='seed',\n"
            "                             values='pearson_r').round(2))\n"
            "ablation = pd.read_csv(figures / 'ablation.csv')\n"
            "ablation.pivot_table(index=['steps', 'weight_decay', 'warmup_ratio'],\n"
            "                     columns=['method', 'module'], values='pearson_r').round(2)"
        ),
        md(
            "## 6. Choosing the magnitude axis\n\n"
            "The paper writes `W ∈ R^{d×k}` with `m ∈ R^{1×k}` — one magnitude per *column*. "
            "In PyTorch an `nn.Linear` weight is stored `(out_features, in_features)`, and every "
            "DoRA implementation (the authors', PEFT, torchtune) keeps one magnitude per "
            "**output feature**, i.e. per row: that is wdanalysis' default `axis='out'`. "
            "Some tutorials take norms per input column instead (`axis='in'`). On square "
            "matrices such as these query projections the two silently give different numbers; "
            "ΔM and ΔD must always use the same axis. This needs the checkpoints, so it runs "
            "when the notebook trained them."
        ),
        code(
            "if trained_here:\n"
            "    runs = {label: Path(OUT) / label.lower() for label in ('FT', 'LoRA', 'DoRA')}\n"
            "    base = model_path()\n"
            "    by_input = wdanalysis.compare(base, runs, modules=['query'], axis='in',\n"
            "                                  progress=False)\n"
            "    fits_in = wdanalysis.fit_lines(by_input, per_step=False)\n"
            "    both = fits[(fits['scope'] == 'pooled') & (fits['module'] == 'query')]\n"
            "    columns = ['method', 'slope', 'pearson_r']\n"
            "    display(both[columns].merge(fits_in[columns], on='method',\n"
            "                                suffixes=(' out', ' in')))\n"
            "else:\n"
            "    print('set TRAIN = True (or QUICK = True) to compare the two axes')"
        ),
    ]
    return new_notebook(cells=cells, metadata=_metadata())


def template() -> nbformat.NotebookNode:
    md, code = new_markdown_cell, new_code_cell
    cells = [
        md(
            "# Analyse your own checkpoints\n\n"
            "Fill in the base model and your runs below, then run all cells. A run is a "
            "folder of `checkpoint-N/` sub-folders (Hugging Face Trainer, `wdanalysis train`) "
            "or a single checkpoint: a full model (`model.safetensors`, sharded safetensors, "
            "`pytorch_model.bin`), a PEFT LoRA/DoRA adapter, or the DoRA authors' formats."
        ),
        parameters(
            "# Parameters: your paths\n"
            'BASE = "path/to/base-model"\n'
            'RUNS = {"FT": "path/to/ft-run", "LoRA": "path/to/lora-run"}\n'
            "MODULES = None  # None = attention query and value; or e.g. ['q_proj', 'v_proj']\n"
            'AXIS = "out"  # magnitude per output feature, as DoRA implementations store it\n'
            'OUT = "runs/my-analysis"'
        ),
        code(
            "from pathlib import Path\n\n"
            "import wdanalysis\n\n"
            "%matplotlib inline\n"
            "print(wdanalysis.format_inspection(wdanalysis.inspect(BASE)))\n"
            "for label, path in RUNS.items():\n"
            "    print(f'\\n--- {label}')\n"
            "    print(wdanalysis.format_inspection(wdanalysis.inspect(path)))"
        ),
        md("## ΔM and ΔD"),
        code("deltas = wdanalysis.compare(BASE, RUNS, modules=MODULES, axis=AXIS)\ndeltas.head()"),
        md("## Fits, figures and files"),
        code(
            "report = wdanalysis.write_report(deltas, Path(OUT))\n"
            "deltas.to_csv(Path(OUT) / 'deltas.csv', index=False)\n"
            "print(report.fit_table)\n"
            "report.paths"
        ),
        code(
            "for module in deltas['module'].unique():\n"
            "    display(wdanalysis.plot_figure2(deltas, module=module, fits=report.fits))"
        ),
    ]
    return new_notebook(cells=cells, metadata=_metadata())


def _metadata() -> dict:
    return {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }


#: the stored outputs (figures as PNG) must stay small enough for a git repository
MAX_BYTES = 1_500_000


def execute(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Run ``notebook`` on the committed results; no per-cell time limit."""
    from nbclient import NotebookClient

    client = NotebookClient(
        notebook, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    )
    client.execute()
    for cell in notebook.cells:  # execution counts and timings only add noise to diffs
        cell.metadata.pop("execution", None)
    return notebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="store the outputs too")
    args = parser.parse_args()
    HERE.mkdir(exist_ok=True)
    notebook = reproduction()
    if args.execute:
        notebook = execute(notebook)
    path = HERE / "figure2_reproduction.ipynb"
    nbformat.write(notebook, path)
    if path.stat().st_size > MAX_BYTES:
        raise SystemExit(f"{path} is {path.stat().st_size} bytes, over {MAX_BYTES}")
    nbformat.write(template(), HERE / "analyze_your_checkpoints.ipynb")
    print("wrote", *sorted(p.name for p in HERE.glob("*.ipynb")))


if __name__ == "__main__":
    main()
