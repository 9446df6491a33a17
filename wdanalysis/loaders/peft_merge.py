"""PEFT's own merge of one adapted module, on the base weight in float64.

For the PEFT tuners other than LoRA (:mod:`wdanalysis.loaders.peft_tuners`) the merged weight
is whatever PEFT's layer class computes, so the maths is the library's, not a copy of it:

1. a standalone layer holding ``W0`` in float64 (``nn.Linear``, ``nn.Embedding``,
   ``nn.Conv1d/2d/3d`` or transformers' ``Conv1D``), put at the module's own path in an
   otherwise empty ``nn.Module`` tree, so PEFT's ``target_modules``/``rank_pattern``/
   ``feedforward_modules``/``layers_to_transform`` matching sees the name it saw in training;
2. the tuner model class (``PEFT_TYPE_TO_TUNER_MAPPING``) wraps it with its layer, in float64;
3. the module's saved tensors, and the shared ones (VeRA's ``vera_A``/``vera_B``, VBLoRA's
   vector bank, …, resized to the saved shapes: they are sized for the whole model), are
   loaded with PEFT's ``set_peft_model_state_dict``; a tensor it does not take, or a tensor
   of the layer the file lacks, is refused;
4. the layer's ``merge()`` writes ``W'`` into the standalone weight.

Only one module is ever in memory. PEFT is an optional dependency (``wdanalysis[peft]``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from wdanalysis.errors import AdapterMismatchError, CheckpointFormatError
from wdanalysis.loaders.layer_shapes import is_embedding_name
from wdanalysis.loaders.peft_patterns import decided_for

ADAPTER = "default"
PEFT_EXTRA = "pip install 'wdanalysis[peft]'"
# Fields every PEFT config carries that say nothing about the merged weight.
_META_FIELDS = {"peft_type", "auto_mapping", "base_model_name_or_path", "revision", "task_type"}


def require_peft(what: str, where: Path):
    """The installed ``peft`` package, or a one-line error naming the extra."""
    try:
        import peft
    except ImportError:
        raise CheckpointFormatError(
            f"{what} adapters are merged by PEFT itself, which is not installed",
            where,
            PEFT_EXTRA,
        ) from None
    return peft


def peft_config(raw: dict, where: Path):
    """PEFT's config object for ``raw``; an unknown field is refused (it could change the
    merged weight), as is a config PEFT itself rejects."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils.peft_types import PeftType

    try:
        cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(str(raw["peft_type"]).upper())]
    except (ValueError, KeyError):  # a tuner newer than the installed PEFT
        raise CheckpointFormatError(
            f"the installed PEFT {_version()} does not know peft_type {raw['peft_type']!r}",
            where,
            "upgrade PEFT: pip install -U peft",
        ) from None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known - _META_FIELDS)
    if unknown:
        raise CheckpointFormatError(
            f"{cls.__name__} field {unknown[0]!r} is unknown to the installed PEFT "
            f"{_version()}, and could change the merged weight",
            where,
            "upgrade PEFT to the version that wrote the adapter",
        )
    kwargs = {k: v for k, v in raw.items() if k in known and k != "peft_type"}
    try:
        with _quiet():
            return cls(**kwargs)
    except Exception as error:  # noqa: BLE001 - any failure of PEFT on the user's JSON
        raise CheckpointFormatError(
            f"PEFT {_version()} rejects this {cls.__name__}: {_first_line(error)}",
            where,
            "re-save the adapter with the installed PEFT",
        ) from None


def standalone_layer(name: str, w0: torch.Tensor, transposed: bool) -> nn.Module:
    """A layer of the base's kind holding ``w0`` in float64 (no bias: only the weight is
    analysed, and no tuner's weight merge reads the bias)."""
    w = w0.detach().to(torch.float64).clone()
    if is_embedding_name(name + ".weight", w.shape):  # named as the package names them
        layer = nn.Embedding(w.shape[0], w.shape[1], dtype=torch.float64)
    elif w.dim() == 2 and transposed:  # GPT-2's Conv1D stores (in, out)
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(w.shape[1], w.shape[0]).to(torch.float64)
    elif w.dim() == 2:
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float64)
    elif 3 <= w.dim() <= 5:
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[w.dim() - 3]
        layer = conv(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=False, dtype=torch.float64)
    else:
        raise AdapterMismatchError(f"{name}: a weight of shape {list(w.shape)} cannot be adapted")
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def merge_module(config, name: str, layer: nn.Module, saved: dict, where: Path) -> torch.Tensor:
    """``W'`` of the module ``name`` as PEFT merges it: ``saved`` holds the module's tensors
    and the shared ones under their names in the adapter file (``base_model.model.…``)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.save_and_load import get_peft_model_state_dict, set_peft_model_state_dict

    root = _tree_with(name, layer)
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
    config = decided_for(_for_module(config, name), name, where)  # patterns: RE2, not re
    try:
        tuner = _wrap(tuner_cls, root, config, layer)
    except (ValueError, TypeError, RuntimeError, NotImplementedError, KeyError) as error:
        raise AdapterMismatchError(
            f"{name}: PEFT cannot wrap this module: {_first_line(error)}",
            where,
            "pass the base model this adapter was trained on",
        ) from None
    holder = _Holder(tuner)
    holder.double()  # the adapter's own tensors in float64 too
    saved = _fit_shared(holder, saved)
    with _quiet():  # what PEFT itself saves for this module
        wanted = get_peft_model_state_dict(holder, adapter_name=ADAPTER)
    _check_saved(wanted, saved, name, layer, where)
    try:
        with _quiet():
            result = set_peft_model_state_dict(holder, dict(saved), adapter_name=ADAPTER)
    except RuntimeError as error:  # size mismatch: trained on another model
        raise AdapterMismatchError(
            f"{name}: {_first_line(error)}",
            where,
            "pass the base model this adapter was trained on",
        ) from None
    _refuse_unloaded(wanted, result, saved, name, where)
    layers = [m for m in root.modules() if isinstance(m, BaseTunerLayer)]
    if len(layers) != 1:
        raise CheckpointFormatError(
            f"{name}: PEFT's {tuner_cls.__name__} does not adapt this module "
            "(target_modules / layers_to_transform leave it out)",
            where,
            "check the adapter config against the adapter's tensors",
        )
    holder.eval()  # as merge_and_unload runs (VB-LoRA's top-k logits refuse training mode)
    with torch.no_grad(), _quiet():
        try:
            layers[0].merge(adapter_names=[ADAPTER])
        except (ValueError, NotImplementedError, RuntimeError) as error:
            raise CheckpointFormatError(
                f"{name}: PEFT cannot merge this {tuner_cls.__name__} module: {_first_line(error)}",
                where,
            ) from None
    return layers[0].get_base_layer().weight.detach().to(torch.float64)


def _wrap(tuner_cls, root: nn.Module, config, layer: nn.Module):
    """The tuner model around ``root``. A tuner whose init derives state from W0 in float32
    only (PSOFT's SVD) is built on the float32 weight, as PEFT builds it on an fp32 model;
    everything is then cast to float64 and W0 itself put back exactly."""
    w0 = layer.weight.detach().clone()
    with _quiet():
        try:
            return tuner_cls(root, copy.deepcopy(config), adapter_name=ADAPTER)
        except TypeError as error:
            if "float32" not in str(error):
                raise
            root.float()
            tuner = tuner_cls(root, copy.deepcopy(config), adapter_name=ADAPTER)
    tuner.double()
    with torch.no_grad():
        tuner_layer = root.get_submodule(_path_of(root, layer))
        tuner_layer.weight.copy_(w0)
    return tuner


def _path_of(root: nn.Module, layer: nn.Module) -> str:
    return next(name for name, module in root.named_modules() if module is layer)


class _Holder(nn.Module):
    """A PeftModel's layout (keys ``base_model.model.<path>``), its attributes looked up
    on the tuner as PeftModel does (AdaLoRA's load calls the tuner's methods on it)."""

    def __init__(self, tuner: nn.Module):
        super().__init__()
        self.base_model = tuner
        self.peft_config = tuner.peft_config

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_model"], name)


def _for_module(config, name: str):
    """AdaLoRA's saved ``rank_pattern`` (module tensor → kept ranks, a list of booleans)
    names every adapted module of the model; the one-module tree takes its own entries."""
    pattern = getattr(config, "rank_pattern", None)
    if not pattern or not all(isinstance(v, list) for v in pattern.values()):
        return config  # the other tuners' rank_pattern: regex → rank, matched by PEFT
    config = copy.deepcopy(config)
    config.rank_pattern = {
        k: v for k, v in pattern.items() if k.rsplit(".", 1)[0] == name or k.startswith(name + ".")
    }
    return config


def _tree_with(name: str, layer: nn.Module) -> nn.Module:
    """An empty module tree holding ``layer`` at the dotted path ``name``."""
    root = node = nn.Module()
    parts = name.split(".")
    for part in parts[:-1]:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(parts[-1], layer)
    return root


def _fit_shared(holder: nn.Module, saved: dict) -> dict:
    """The saved tensors this module's merge takes. Shared tensors (``base_model.vera_A``
    …) are sized for the whole model, larger than this one module's: the holder's entries
    get the saved shapes before loading, as the whole model has them (each layer slices
    the part it uses). An entry of a shared dict keyed by another kind of module (FRoD's
    ``frod_V.<category>``) is left out; any other shared tensor is loaded (and refused by
    :func:`_refuse_unloaded` when PEFT has no place for it)."""
    own = dict(holder.state_dict(keep_vars=True))
    taken = {}
    for key, value in saved.items():
        if key.startswith("base_model.model."):
            taken[key] = value
            continue
        container, _, _entry = key.rpartition(".")
        target = f"{key}.{ADAPTER}"
        if target not in own and any(k.startswith(container + ".") for k in own):
            continue  # another category's entry of a shared dict
        taken[key] = value
        if target in own and tuple(own[target].shape) != tuple(value.shape):
            owner_name, _, leaf = target.rpartition(".")
            owner = holder.get_submodule(owner_name)
            blank = torch.zeros(value.shape, dtype=torch.float64)
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(blank, requires_grad=False)
            else:
                owner._buffers[leaf] = blank
    return taken


def _check_saved(wanted: dict, saved: dict, name: str, layer: nn.Module, where: Path) -> None:
    """Each saved tensor has the shape PEFT's layer for this base weight holds (else the
    adapter was trained on a model of another size); integer tensors are index buffers
    (SHiRA's, FourierFT's …) or quantized weights: only the former, that PEFT itself
    saves as integers, are taken."""
    for key, value in saved.items():
        target = wanted.get(key)
        if target is not None and tuple(target.shape) != tuple(value.shape):
            raise AdapterMismatchError(
                f"{name}: adapter tensor {key.split(name + '.', 1)[-1]!r} has shape "
                f"{list(value.shape)}, but on the base weight {list(layer.weight.shape)} "
                f"PEFT's layer holds {list(target.shape)}",
                where,
                "this adapter was trained on a model of another size; pass its base model",
            )
        if not value.is_floating_point() and (target is None or target.is_floating_point()):
            raise AdapterMismatchError(
                f"adapter tensor {key!r} has dtype {str(value.dtype).replace('torch.', '')}; "
                "quantized or integer adapter weights are not supported",
                where,
                "save the adapter in fp32/fp16/bf16",
            )


def _refuse_unloaded(wanted: dict, result, saved: dict, name: str, where: Path) -> None:
    """Unknown means refuse: a saved tensor PEFT's layer does not take, or a tensor PEFT
    itself saves for this module (``get_peft_model_state_dict``) that the file does not
    hold: it would keep its random init. (What PEFT does not save, such as AdaLoRA's
    ``ranknum``, comes from the config.)"""
    unexpected = [k for k in result.unexpected_keys if k]
    if unexpected:
        raise CheckpointFormatError(
            f"adapter tensor {unexpected[0]!r} is not one PEFT's layer for {name} takes",
            where,
            "the adapter config does not match its tensors; re-save the adapter with PEFT",
        )
    missing = sorted(set(wanted) - set(saved))
    if missing:
        raise CheckpointFormatError(
            f"the adapter file lacks {missing[0]!r} for {name} "
            "(a shared projection saved with save_projection=False, or an incomplete save)",
            where,
            "re-save the adapter with every tensor (VeRA/RandLoRA: save_projection=True)",
        )


@contextlib.contextmanager
def _quiet():
    """PEFT warns about things that concern training (dropout, init), not the merge."""
    logger = logging.getLogger("peft")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _version() -> str:
    import peft

    return peft.__version__
