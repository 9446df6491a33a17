"""Write the two notebooks under notebooks/ (run once; the .ipynb files are committed).

Kept as code so that the notebooks' text is reviewed like code; outputs are not stored.
"""

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
            "This notebook runs `wdanalysis demo` through the Python API: FT, LoRA and DoRA on "
            "all-MiniLM-L6-v2 (a 6-layer BERT shipped by a PyPI package) for tweet sentiment, "
            "in the DoRA authors' Figure-2 regime (AdamW, weight decay 0.01 except biases and "
            "LayerNorms, 10 % warm-up then linear decay, gradient clip 5, rank = hidden/6 at "
            "scale 1, lr 1e-3 for the adapters), then analyses the query and value matrices "
            "with statistics that respect how the points were made."
        ),
        parameters(
            "# Parameters (CI runs this notebook with QUICK = True)\n"
            'OUT = "runs/notebook"\n'
            "QUICK = False\n"
            "SEED = 0\n"
            "FIGURES = None  # folder with the committed seeds.csv / ablation.csv (default: repo)"
        ),
        code(
            "from pathlib import Path\n\n"
            "import pandas as pd\n\n"
            "import wdanalysis\n"
            "from wdanalysis.demo import DemoSettings, model_path, run_demo\n"
            "from wdanalysis.demo.summary import format_summary\n"
            "from wdanalysis.stats.resampling import layer_permutation_test\n"
            "from wdanalysis.plots.seed_correlations import plot_seed_correlations\n\n"
            "%matplotlib inline\n"
            "settings = DemoSettings.quick(SEED) if QUICK else DemoSettings(seed=SEED)\n"
            "repo = Path(wdanalysis.__file__).parents[1]\n"
            "figures = Path(FIGURES) if FIGURES else repo / 'figures'\n"
            "settings"
        ),
        md(
            "## 1. Train the three methods, analyse, fit\n\n"
            "Same data order and schedule for every method; checkpoints at 25/50/75/100 % of "
            "the steps; held-out accuracy at each checkpoint shows how far training got "
            "(about 10 minutes on 2 CPU cores; a minute with `QUICK`)."
        ),
        code(
            "result = run_demo(OUT, settings, progress=False)\n"
            "pd.read_csv(Path(OUT) / 'accuracy.csv').pivot(index='step', columns='method', "
            "values='accuracy')"
        ),
        md(
            "## 2. The verdict, with honest uncertainty\n\n"
            "The points are layers × steps of **one** run, not independent draws. Besides the "
            "pooled r, each row has a 95 % interval from a cluster bootstrap over whole layers, "
            "the *within-step* r (ΔM and ΔD centred per step, so the common growth over "
            "training is removed), the per-step r at the first and last checkpoint, and a "
            "permutation test over layers of each method's r against LoRA's."
        ),
        code("print(format_summary(result.summary))"),
        code(
            "deltas = result.deltas\n"
            "fits = wdanalysis.fit_lines(deltas)\n"
            "fits[fits['scope'] == 'step'][['method', 'module', 'step', 'slope', 'pearson_r']]"
        ),
        code("layer_permutation_test(deltas, 'DoRA', 'FT', 'query')"),
        md("## 3. Figure 2 (query) and Figure 6 (value)"),
        code("wdanalysis.plot_figure2(deltas, module='query', fits=fits)"),
        code("wdanalysis.plot_figure2(deltas, module='value', fits=fits)"),
        md(
            "The trajectory view (not in the paper): how ΔM and ΔD grow with the step, "
            "one line per layer."
        ),
        code("wdanalysis.plot_trajectories(deltas, module='query')"),
        md(
            "## 4. Seeds: is a sign a property of the regime or of one run?\n\n"
            "`wdanalysis demo --seeds 3` trains seeds 0, 1, 2 and writes `seeds.csv`; the "
            "committed one (README, 'Demo results') is read here, not recomputed."
        ),
        code(
            "if (figures / 'seeds.csv').is_file():\n"
            "    per_seed = pd.read_csv(figures / 'seeds.csv')\n"
            "    display(per_seed.pivot_table(index=['method', 'module'], columns='seed',\n"
            "                                 values='pearson_r').round(2))\n"
            "    display(plot_seed_correlations(per_seed, module='query'))\n"
            "else:\n"
            "    print('no seeds.csv in', figures)"
        ),
        md(
            "## 5. Which part of the regime moves the signs? The ablation, every cell\n\n"
            "`wdanalysis demo --ablation` trains steps {150, 500} × weight decay {0, 0.01} × "
            "warm-up {0, 10 %} (seed 0; one draw per cell). Every cell is shown."
        ),
        code(
            "if (figures / 'ablation.csv').is_file():\n"
            "    ablation = pd.read_csv(figures / 'ablation.csv')\n"
            "    display(ablation.pivot_table(\n"
            "        index=['steps', 'weight_decay', 'warmup_ratio'],\n"
            "        columns=['method', 'module'], values='pearson_r').round(2))\n"
            "    display(ablation.pivot_table(\n"
            "        index=['steps', 'weight_decay', 'warmup_ratio'],\n"
            "        columns='method', values='accuracy').round(3))\n"
            "else:\n"
            "    print('no ablation.csv in', figures)"
        ),
        md(
            "## 6. Choosing the magnitude axis\n\n"
            "The paper writes `W ∈ R^{d×k}` with `m ∈ R^{1×k}` — one magnitude per *column*. "
            "In PyTorch an `nn.Linear` weight is stored `(out_features, in_features)`, and every "
            "DoRA implementation (the authors', PEFT, torchtune) keeps one magnitude per "
            "**output feature**, i.e. per row: that is wdanalysis' default `axis='out'`. "
            "Some tutorials take norms per input column instead (`axis='in'`). On square "
            "matrices such as these query projections the two silently give different numbers; "
            "ΔM and ΔD must always use the same axis."
        ),
        code(
            "runs = {label: Path(OUT) / label.lower() for label in ('FT', 'LoRA', 'DoRA')}\n"
            "base = model_path()\n"
            "by_input = wdanalysis.compare(\n"
            "    base, runs, modules=['query'], axis='in', progress=False)\n"
            "fits_in = wdanalysis.fit_lines(by_input, per_step=False)\n"
            "both = fits[(fits['scope'] == 'pooled') & (fits['module'] == 'query')]\n"
            "columns = ['method', 'slope', 'pearson_r']\n"
            "both[columns].merge(fits_in[columns], on='method', suffixes=(' out', ' in'))"
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
            "import wdanalysis\n"
            "from wdanalysis.table.inspection import format_inspection\n\n"
            "%matplotlib inline\n"
            "print(format_inspection(wdanalysis.inspect(BASE)))\n"
            "for label, path in RUNS.items():\n"
            "    print(f'\\n--- {label}')\n"
            "    print(format_inspection(wdanalysis.inspect(path)))"
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


if __name__ == "__main__":
    HERE.mkdir(exist_ok=True)
    nbformat.write(reproduction(), HERE / "figure2_reproduction.ipynb")
    nbformat.write(template(), HERE / "analyze_your_checkpoints.ipynb")
    print("wrote", *sorted(p.name for p in HERE.glob("*.ipynb")))
