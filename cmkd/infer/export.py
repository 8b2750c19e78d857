"""`cmkd export`: one self-contained model from a fixed-length waveform to class probabilities.

The exported graph is featurizer + classifier + sigmoid/softmax, so a deployment needs only
the waveform at the model's sample rate (mono, float32 in [-1, 1], exactly ``num_samples`` long).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cmkd import storage
from cmkd.audio.features import Fbank
from cmkd.infer.loading import describe
from cmkd.infer.sources import InferError
from cmkd.models.factory import LoadedModel

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
# Above this, ONNX protobufs (2 GiB limit) need their weights in a side file.
_ONNX_INLINE_BYTES = 1_500_000_000


class WaveToProbs(nn.Module):
    """``wave [B, num_samples]`` → probabilities ``[B, C]``, computing exactly what ``Fbank`` does.

    ``Fbank.raw_log_mel`` slices the frame axis in a Python loop on CPU (sized by the batch),
    which a traced graph would freeze; here the frames are gathered once by a fixed index and
    the very same per-frame math (``_frames_to_log_mel``) runs on all of them.
    """

    def __init__(self, model: LoadedModel, num_samples: int):
        super().__init__()
        fb = model.featurizer
        if not isinstance(fb, Fbank):
            raise InferError(
                f"export supports the batched featurizers.fbank front end; this checkpoint uses "
                f"{type(fb).__name__}. Retrain with frontend.featurizer = @featurizers.fbank"
            )
        frames = fb.num_frames(num_samples)
        if frames < 1:
            raise InferError(
                f"--clip-seconds gives {num_samples} samples, shorter than one {fb.frame_length_ms:g} ms frame; "
                f"use a longer clip"
            )
        self.featurizer, self.classifier = fb, model.classifier
        self.multilabel, self.num_samples = model.multilabel, num_samples
        offsets = torch.arange(frames)[:, None] * fb.window_shift + torch.arange(fb.window_size)[None]
        self.register_buffer("frame_index", offsets, persistent=False)  # [frames, window]

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        fb = self.featurizer
        wave = wave - wave.mean(dim=1, keepdim=True)  # per-clip DC removal, as Fbank
        log_mel = fb._frames_to_log_mel(wave[:, self.frame_index]).transpose(1, 2)
        x = fb.normalize(fb.pad_or_cut(log_mel).unsqueeze(1))
        logits = self.classifier(x)
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=-1)


@dataclass
class Exported:
    path: str
    format: str
    num_samples: int
    max_abs_diff: float | None  # exported vs PyTorch on a check input


def default_path(checkpoint_url: str, fmt: str) -> str:
    base = checkpoint_url[:-3] if checkpoint_url.endswith(".pt") else checkpoint_url
    return base + SUFFIX[fmt]


def check_input(num_samples: int, sample_rate: int, batch: int = 2) -> torch.Tensor:
    """A reproducible, speech-level input: a chirp plus noise (not silence, which hides errors)."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(num_samples) / sample_rate
    chirp = 0.2 * torch.sin(2 * torch.pi * (200 + 400 * t) * t)
    return (chirp + 0.05 * torch.randn(batch, num_samples, generator=g)).float()


def export(model: LoadedModel, fmt: str, out: str, num_samples: int, overwrite: bool = False) -> Exported:
    """Write ``model`` as ONNX (opset from torch's exporter) or TorchScript and check it runs."""
    if fmt not in FORMATS:
        raise InferError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if storage.exists(out) and not overwrite:
        raise InferError(f"{out} already exists; pass --overwrite to replace it or choose another -o")
    wrapper = WaveToProbs(model, num_samples).cpu().eval()
    example = check_input(num_samples, model.sample_rate)
    with torch.inference_mode():
        reference = wrapper(example).numpy()
    meta = {**describe(model), "num_samples": num_samples, "input": "wave [batch, num_samples] float32 mono",
            "output": "sigmoid" if model.multilabel else "softmax"}
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model" + SUFFIX[fmt])
        if fmt == "onnx":
            got = _export_onnx(wrapper, example, local, meta)
        else:
            got = _export_torchscript(wrapper, example, local, meta)
        for name in sorted(os.listdir(tmp)):  # the model, plus an ONNX weights side file if any
            suffix = name[len("model" + SUFFIX[fmt]):]
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes(out + suffix, f.read())
    diff = None if got is None else float(np.abs(got - reference).max())
    return Exported(out, fmt, num_samples, diff)


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, path: str, meta: dict[str, Any]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice is not the user's problem
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        torch.jit.save(traced, path, _extra_files={"cmkd.json": json.dumps(meta)})
        loaded = torch.jit.load(path)
    with torch.inference_mode():
        return loaded(example).numpy()


def _export_onnx(wrapper: nn.Module, example: torch.Tensor, path: str, meta: dict[str, Any]) -> np.ndarray | None:
    import onnx

    big = sum(p.numel() * p.element_size() for p in wrapper.parameters()) > _ONNX_INLINE_BYTES
    batch = torch.export.Dim("batch", min=1)
    # The exporter prints its progress on stdout; keep it for the error message only.
    chatter = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=["wave"],
                                        output_names=["probabilities"], dynamic_shapes=({0: batch},))
        except Exception as err:  # name the failing op for a bug report instead of a 200-line trace
            last = (chatter.getvalue().strip().splitlines() or [""])[-1]
            raise InferError(f"ONNX export failed at {last!r} "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
                             f"try --format torchscript and report this at the cmkd issue tracker") from None
        program.save(path, external_data=big)
    proto = onnx.load(path, load_external_data=False)
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"cmkd.{k}", json.dumps(v)
    onnx.save(proto, path)
    try:
        import onnxruntime as ort
    except ImportError:  # exported, but unchecked; the CLI says so
        return None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"wave": example.numpy()})[0]


def read_metadata(path: str) -> dict[str, Any]:
    """The cmkd metadata stored in an exported ONNX or TorchScript file."""
    if path.endswith(".onnx"):
        import onnx

        proto = onnx.load(path, load_external_data=False)
        return {p.key[5:]: json.loads(p.value) for p in proto.metadata_props if p.key.startswith("cmkd.")}
    extra = {"cmkd.json": ""}
    torch.jit.load(path, _extra_files=extra)
    return json.loads(extra["cmkd.json"])
