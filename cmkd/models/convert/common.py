"""What every converter shares: the result type, safe file reading, class lists, gin text."""

from __future__ import annotations

import csv
import io
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from cmkd import checkpoint, storage
from cmkd.errors import CmkdError

# The AST release's AudioSet front end (ast src/run.sh / src/dataloader.py): 16 kHz, 128 mel bins, 1024 frames.
AUDIOSET_NORM = (-4.2677393, 4.5689974)


class ConvertError(CmkdError, ValueError):
    """A source that cannot be imported; the message says what was found and what is supported."""


@dataclass
class Imported:
    """A converted model: everything a cmkd checkpoint holds besides the format markers."""

    model: dict[str, torch.Tensor]
    config: str  # gin text that builds the featurizer and classifier (load_model parses it)
    classes: list[str]
    multilabel: bool
    sample_rate: int
    target_frames: int
    norm: tuple[float, float] | None
    source: str
    source_format: str
    extra: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        """The dict ``cmkd.checkpoint.save`` writes (same fields as a trained stage's best.pt)."""
        # clip_samples: the clip length whose Kaldi framing gives exactly target_frames (25 ms / 10 ms).
        win, hop = self.sample_rate * 25 // 1000, self.sample_rate * 10 // 1000
        clip_samples = win + (self.target_frames - 1) * hop
        return dict(
            experiment="imported", stage=None, config=self.config, classes=list(self.classes),
            multilabel=bool(self.multilabel), sample_rate=int(self.sample_rate), clip_samples=int(clip_samples),
            norm=list(self.norm) if self.norm else None, model=self.model, metrics={}, epoch=None, step=None,
            imported_from=self.source, imported_format=self.source_format,
        )


def read_source(url: str) -> bytes:
    """The bytes of one file (any fsspec URL), with errors that name it."""
    try:
        return storage.read_bytes(url)
    except FileNotFoundError:
        raise ConvertError(f"{url} does not exist; check the path or URL") from None
    except IsADirectoryError:
        raise ConvertError(f"{url} is a folder without config.json; "
                           "pass a Hugging Face model folder or a .pth file") from None


def load_torch(data: bytes, url: str) -> Any:
    """``torch.load(weights_only=True)``: plain tensors and containers only, no code runs."""
    if data[:4] != b"PK\x03\x04" and data[:2] != b"\x80\x02":
        raise ConvertError(f"{url} is not a PyTorch file (it starts with {data[:8]!r}); "
                           f"expected a .pth/.bin written by torch.save or a .safetensors file")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused a global: the file wants to run code
        raise ConvertError(f"{url} holds objects other than tensors, which are never unpickled here "
                           f"({checkpoint.refused(err)}); "
                           f"re-save it with torch.save(model.state_dict(), path)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ConvertError(f"{url} is truncated or corrupt ({type(err).__name__}: {first}); "
                           "download it again") from None


def load_safetensors(data: bytes, url: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load
    except ImportError:
        raise ConvertError(f"{url} is a safetensors file; install the `hf` extra: pip install 'cmkd[hf]'") from None
    try:
        return load(data)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ConvertError(f"{url} is truncated or corrupt ({type(err).__name__}: {str(err)[:200]}); "
                           f"download it again") from None


def tensors_of(obj: Any, url: str) -> dict[str, torch.Tensor]:
    """The flat tensor dict in a loaded file (a state dict, possibly wrapped as {'state_dict': ...})."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in ("state_dict", "model", "model_state_dict") if isinstance(obj.get(k), Mapping)),
                     None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ConvertError(f"{url} holds a {type(obj).__name__}, not a state dict; {SUPPORTED}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConvertError(f"{url} holds no tensors (keys: {sample_keys(obj)}); {SUPPORTED}")
    return tensors


SUPPORTED = ("supported: a Hugging Face ASTForAudioClassification (hub id, or a folder with config.json and "
             "model.safetensors/pytorch_model.bin), an AST-release .pth (module.v.*, module.mlp_head.*) or a PSLA "
             "EfficientNet .pth (module.effnet.*, module.attention.*)")


def sample_keys(state: Mapping[str, Any], n: int = 6) -> str:
    keys = sorted(map(str, state))
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


def read_classes(url: str, expected: int) -> list[str]:
    """Class names from a text file (one per line) or the AST repo's ``class_labels_indices.csv``."""
    text = read_source(url).decode("utf-8-sig")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and lines[0].replace(" ", "").lower().startswith("index,mid,display_name"):
        names = [row[2] for row in csv.reader(lines[1:])]
    else:
        names = [ln.strip() for ln in lines]
    if len(names) != expected:
        raise ConvertError(f"--classes {url} lists {len(names)} classes but the model has {expected} outputs")
    if len(set(names)) != len(names):
        raise ConvertError(f"--classes {url} repeats class names; each must be unique")
    return names


def frontend_gin(n_mels: int, target_frames: int) -> str:
    return (
        "frontend.featurizer = @featurizers.fbank\n"
        f"featurizers.fbank.n_mels = {int(n_mels)}\n"
        f"featurizers.fbank.target_frames = {int(target_frames)}\n"
    )


def ast_gin(*, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, patch: int, stride: int,
            norm_eps: float, head_norm_eps: float) -> str:
    # pretrained=False: the checkpoint's weights are the model; nothing to fetch.
    return (
        "classifier.backbone = @backbones.ast\n"
        f"backbones.ast.embed_dim = {embed_dim}\nbackbones.ast.depth = {depth}\n"
        f"backbones.ast.num_heads = {num_heads}\nbackbones.ast.mlp_ratio = {mlp_ratio!r}\n"
        f"backbones.ast.patch = {patch}\nbackbones.ast.stride = {stride}\nbackbones.ast.distilled = True\n"
        f"backbones.ast.norm_eps = {norm_eps!r}\nbackbones.ast.pretrained = False\n"
        "classifier.pooler = @poolers.token\n"
        "classifier.head = @heads.linear\n"
        f"heads.linear.norm = True\nheads.linear.norm_eps = {head_norm_eps!r}\n"
    )


def read_json(url: str) -> dict[str, Any]:
    try:
        return json.loads(read_source(url).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConvertError(f"{url} is not valid JSON ({err}); download it again") from None


def frames_for_grid(t_dim: int, patch: int, stride: int) -> int:
    """Frames of the release's input for a time grid of ``t_dim`` patches."""
    known = {101: 1024, 50: 512, 12: 128}  # AudioSet, ESC-50, Speech Commands (ast egs/*/run*.sh)
    if stride == 10 and patch == 16 and t_dim in known:
        return known[t_dim]
    return (t_dim - 1) * stride + patch
