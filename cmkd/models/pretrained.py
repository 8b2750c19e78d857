"""Loading and adapting pretrained weights: files at any fsspec URL, timm downloads, and the
two adaptations every audio model here needs (RGB stem -> 1 channel, positional grid resize)."""

from __future__ import annotations

import contextlib
import contextvars
import io
import math
import os
import pickle
import sys
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cmkd import storage
from cmkd.errors import CmkdError

# Keys under which trainers commonly nest the weights inside a checkpoint dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")

# Where to tell users to get weights by hand when the machine is offline.
_OFFLINE_HOWTO = (
    "Download the weights on a machine with internet access, e.g.\n"
    "    python -c \"import timm, torch; torch.save(timm.create_model('{name}', pretrained=True).state_dict(), "
    "'{name}.pth')\"\n"
    "then copy the file here (or to a bucket) and pass it with `weights='/path/to/{name}.pth'` "
    "(any fsspec URL works) and `pretrained=False`. Setting HF_HUB_OFFLINE=1 with a filled "
    "Hugging Face cache also works."
)


# Set while rebuilding a model whose weights come from a checkpoint: no download is needed.
_skip_weights: contextvars.ContextVar[bool] = contextvars.ContextVar("cmkd_skip_pretrained", default=False)


@contextlib.contextmanager
def skip_pretrained_weights() -> Iterator[None]:
    """Build backbones without fetching ``pretrained=`` / ``weights=`` (same architecture, random init).

    Use it when a checkpoint's weights are loaded right after (inference, a frozen teacher),
    so an offline machine never tries to download ImageNet weights it would overwrite.
    """
    token = _skip_weights.set(True)
    try:
        yield
    finally:
        _skip_weights.reset(token)


def pretrained_weights_skipped() -> bool:
    return _skip_weights.get()


# Set while the preflight builds every stage's model (meta device): weights are checked, not read.
_probe_weights: contextvars.ContextVar[bool] = contextvars.ContextVar("cmkd_probe_pretrained", default=False)


@contextlib.contextmanager
def probe_pretrained_weights() -> Iterator[None]:
    """Build backbones checking that their ``pretrained=`` / ``weights=`` can be had, without reading them."""
    token = _probe_weights.set(True)
    try:
        yield
    finally:
        _probe_weights.reset(token)


def probing_weights() -> bool:
    return _probe_weights.get()


def check_weights_file(url: str | os.PathLike[str]) -> None:
    """A ``weights=`` file exists (the preflight's check: the file is read when the stage trains)."""
    url = os.fspath(url)
    fs, path = storage.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"weights file {url!r} does not exist; check the path/URL passed as `weights=`")


def check_pretrained_available(name: str) -> None:
    """timm's pretrained ``name`` can be had: the hub answers, or the file is in the local cache."""
    if _in_hub_cache(name):
        return
    reason = ("HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache" if _offline_chosen()
              else _hub_unreachable())
    if reason is not None:
        raise PretrainedUnavailableError(offline_message(name, reason))


def _in_hub_cache(name: str) -> bool:
    try:
        import timm.models
        from huggingface_hub import try_to_load_from_cache

        repo = timm.models.get_pretrained_cfg(name).hf_hub_id
        return any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin"))
    except Exception:  # noqa: BLE001 - no cfg, no hub id: not known to be cached
        return False


class PretrainedUnavailableError(CmkdError, RuntimeError):
    """Pretrained weights could not be fetched (offline, blocked, or missing upstream)."""


class WeightsError(CmkdError, ValueError):
    """A weights file was found but does not fit the model; the message says how to fix it."""


def load_state_dict(path_or_url: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a local path or fsspec URL (``s3://``, ``gs://``, ``https://``...).

    ``.safetensors`` files are read with safetensors; everything else with
    ``torch.load(weights_only=True)`` (no arbitrary pickles). Common wrappers such as
    ``{"model": ...}`` or ``{"state_dict": ...}`` are unwrapped and a DataParallel ``module.``
    prefix is stripped.
    """
    url = os.fspath(path_or_url)
    try:
        with storage.open_file(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"weights file {url!r} does not exist; check the path/URL passed as `weights=`"
        ) from None
    except Exception as err:  # noqa: BLE001 - fsspec backends raise many types
        raise WeightsError(f"could not open weights {url!r}: {type(err).__name__}: {err}") from err
    try:
        if url.endswith(".safetensors"):
            state = _load_safetensors(data, url)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise WeightsError(
            f"could not read weights {url!r} ({type(err).__name__}: {first_lines(err, 1)}). The file is corrupt or "
            f"holds objects other than tensors; re-save it with torch.save(model.state_dict(), path)"
        ) from err
    return unwrap_state_dict(state, where=url)


def _load_safetensors(data: bytes, url: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load
    except ImportError:
        raise WeightsError(f"{url!r} is a .safetensors file; install it with `pip install safetensors`") from None
    return load(data)


def unwrap_state_dict(state: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Dig the tensor dict out of a checkpoint and drop a DataParallel ``module.`` prefix."""
    # A flat state dict never maps a wrapper key to a dict, so unwrapping first is safe even when
    # the checkpoint also holds loose tensors (a step counter, normalisation stats).
    while isinstance(state, Mapping):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping):
        raise WeightsError(f"{where} holds a {type(state).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(
            f"{where} holds no state dict: top-level keys are {sorted(map(str, state))[:10]}; expected tensors "
            f"or one of {_WRAPPER_KEYS} wrapping them"
        )
    return strip_prefix(tensors, "module.")


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop ``prefix`` when every key has it (e.g. DataParallel's ``module.``)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def select_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep only the keys under ``prefix`` (stripped) when there are any, else return all keys.

    Lets a backbone load from a whole-classifier checkpoint (``backbone.*``) as well as from
    its own state dict.
    """
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return sub if sub else dict(state)


def merge_input_channels(weight: torch.Tensor, in_chans: int = 1) -> torch.Tensor:
    """Adapt a first-conv weight ``[O, C, kh, kw]`` to ``in_chans`` inputs.

    For one channel, sum over the RGB channels: a grey image repeated to RGB then gives the
    same activations as the original network (what the AST repo and timm's ``in_chans=1`` do).
    """
    if weight.ndim != 4:
        raise WeightsError(
            f"merge_input_channels expects a conv weight [O, C, kh, kw], got shape {tuple(weight.shape)}"
        )
    if weight.shape[1] == in_chans:
        return weight
    if in_chans != 1:
        raise WeightsError(
            f"cannot adapt a {weight.shape[1]}-channel conv weight to {in_chans} channels; only merging to 1 "
            f"channel is supported (audio spectrograms have one)"
        )
    return weight.sum(dim=1, keepdim=True)


def resize_pos_embed(
    pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int
) -> torch.Tensor:
    """Resize a positional embedding ``[1, prefix + H*W, D]`` to ``new_grid`` one axis at a time.

    Each axis is cut from the middle when it shrinks and bilinearly interpolated when it grows,
    as in the AST repo (``src/models/ast_models.py``): the time axis first, then frequency.
    The prefix (CLS/distillation) embeddings are kept unchanged in front.
    """
    (old_h, old_w), (new_h, new_w) = old_grid, new_grid
    if pos.ndim != 3 or pos.shape[1] != num_prefix + old_h * old_w:
        raise WeightsError(
            f"pos_embed of shape {tuple(pos.shape)} does not match {num_prefix} prefix tokens + a "
            f"{old_h}x{old_w} grid ({num_prefix + old_h * old_w} tokens); pass the grid it was trained with"
        )
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    dim = pos.shape[-1]
    grid = grid.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2).float()
    if new_w <= old_w:
        start = old_w // 2 - new_w // 2
        grid = grid[:, :, :, start:start + new_w]
    else:
        grid = F.interpolate(grid, size=(old_h, new_w), mode="bilinear")
    if new_h <= old_h:
        start = old_h // 2 - new_h // 2
        grid = grid[:, :, start:start + new_h, :]
    else:
        grid = F.interpolate(grid, size=(new_h, new_w), mode="bilinear")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1).contiguous()


def first_lines(err: BaseException, n: int = 4) -> str:
    """The first ``n`` lines of an error message (torch's load errors list every tensor)."""
    lines = str(err).strip().splitlines()
    return "\n".join(lines[:n]) + (f"\n... ({len(lines) - n} more lines)" if len(lines) > n else "")


def square_grid(num_patches: int, where: str = "pos_embed") -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise WeightsError(f"{where} has {num_patches} patch positions, which is not a square image grid")
    return side, side


def _is_network_error(err: BaseException) -> bool:
    # Downloads fail as OSError (urllib, requests, huggingface_hub) or as httpx/urllib3 errors.
    root = type(err).__module__.split(".")[0]
    return isinstance(err, (OSError, ConnectionError, TimeoutError)) or root in {
        "httpx", "httpcore", "requests", "urllib3", "huggingface_hub"
    }


def create_timm_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with clear errors for unknown names and failed downloads.

    With no route to the Hugging Face hub, the download is tried from the local cache only
    (offline mode), so a machine without network fails in a second, not after a dozen retries."""
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(
            f"unknown timm model {name!r}; similar names: {close or 'none'}. "
            f"List them with `python -c \"import timm; print(timm.list_models('*pattern*'))\"`"
        )
    if pretrained and probing_weights():
        check_pretrained_available(name)
        pretrained = False
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    reason = _hub_unreachable()
    try:
        with _quiet_hub(offline=reason is not None):
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:
        if _is_network_error(err):
            raise PretrainedUnavailableError(offline_message(name, reason or f"{type(err).__name__}: "
                                                                             f"{first_lines(err, 1)}")) from err
        raise


def offline_message(name: str, reason: str) -> str:
    """One line: what failed, and the two ways on (no pretrained weights, or a local file)."""
    selector = ("backbones.ast" if name.startswith(("deit", "vit")) else
                "backbones.efficientnet" if "efficientnet" in name else "backbones.timm")
    return (f"could not fetch the pretrained weights of timm model {name!r}: this machine looks offline ({reason}). "
            f"Train from random weights with -b PRETRAINED=False, or fetch the file on a machine with network "
            f"(docs/pretrained.md) and bind -b \"{selector}.weights='/path/to/{name}.pth'\" (any fsspec URL; "
            f"HF_HUB_OFFLINE=1 with a filled Hugging Face cache works too)")


def _offline_chosen() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (None: it can, or HF_HUB_OFFLINE says use the cache)."""
    import socket
    from urllib.parse import urlparse

    if _offline_chosen():
        return None  # the user chose the cache; timm reads it
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    try:
        socket.create_connection((host, url.port or (80 if url.scheme == "http" else 443)), timeout=timeout).close()
        return None
    except OSError as err:
        return f"{host} unreachable: {err.strerror or type(err).__name__}"


@contextlib.contextmanager
def _quiet_hub(offline: bool) -> Iterator[None]:
    """No retry warnings from huggingface_hub; the local cache only when the hub is unreachable."""
    import logging

    from huggingface_hub import constants

    hub_log = logging.getLogger("huggingface_hub")
    level, was_offline = hub_log.level, constants.HF_HUB_OFFLINE
    hub_log.setLevel(logging.ERROR)
    constants.HF_HUB_OFFLINE = was_offline or offline
    try:
        yield
    finally:
        hub_log.setLevel(level)
        constants.HF_HUB_OFFLINE = was_offline


def timm_pretrained_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The state dict of timm's pretrained ``name`` (downloaded or from the local cache).

    Raises ``PretrainedUnavailableError`` with a how-to when the download fails.
    """
    return create_timm_model(name, pretrained=True).state_dict()


def timm_checkpoint_filter(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the timm model family's own ``checkpoint_filter_fn`` (key remaps, pos-embed resampling)."""
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(state, model)
    except TypeError:  # older filters take only the state dict
        return filter_fn(state)
