"""Locally built "pretrained" files for the import tests: no network, tiny random weights.

- ``hf_folder``: a random transformers ``ASTForAudioClassification`` + ``ASTFeatureExtractor``
  saved with ``save_pretrained`` (what the hub's MIT/ast-finetuned-* folders hold).
- ``release_pth``: an AST-release ``.pth`` with the key layout of ast ``src/models/ast_models.py``
  (``ASTModel``: ``v`` = timm DeiT with a 1-channel stride-10 patch conv and an audio-sized
  ``pos_embed``; ``mlp_head`` = LayerNorm + Linear; saved from ``nn.DataParallel`` -> ``module.``),
  plus ``ReleaseAST``, that file's forward, as the parity reference.
- ``write_clip``: real audio (tones + noise) written and decoded with soundfile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as kaldi
from torch import nn

SR = 16000
FRAMES = 100  # 1.015 s clips: 400 + 99 * 160 samples
CLIP_SAMPLES = 400 + (FRAMES - 1) * 160


def write_clip(path: Path, seconds: float = CLIP_SAMPLES / SR, seed: int = 0) -> np.ndarray:
    """A 16-bit WAV of a chord plus noise; returns what soundfile decodes from it (float32)."""
    t = np.arange(round(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    wave = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1250 * t * (1 + t)) \
        + 0.03 * rng.standard_normal(t.size)
    sf.write(str(path), wave.astype(np.float32), SR, subtype="PCM_16")
    decoded, sr = sf.read(str(path), dtype="float32")
    assert sr == SR
    return decoded


def hf_folder(path: Path, *, num_labels: int = 10, mean: float = -5.1, std: float = 3.3, seed: int = 0,
              multilabel: bool = False, n_mels: int = 128, frames: int = FRAMES,
              names: list[str] | None = None) -> Path:
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    torch.manual_seed(seed)
    labels = {i: names[i] if names else f"sound_{i}" for i in range(num_labels)}
    config = ASTConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192,
                       max_length=frames, num_mel_bins=n_mels, id2label=labels,
                       label2id={v: k for k, v in labels.items()},
                       problem_type="multi_label_classification" if multilabel else None)
    model = ASTForAudioClassification(config).eval()
    with torch.no_grad():  # random LayerNorm affine params, so a swapped weight/bias shows
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    ASTFeatureExtractor(max_length=frames, num_mel_bins=n_mels, mean=mean, std=std).save_pretrained(str(path))
    return path


class ReleaseAST(nn.Module):
    """ast src/models/ast_models.py ``ASTModel`` (fstride = tstride = 10), reduced to its forward."""

    def __init__(self, label_dim: int, embed_dim: int, depth: int, num_heads: int, input_tdim: int,
                 input_fdim: int = 128):
        super().__init__()
        from timm.models.deit import VisionTransformerDistilled

        # The release builds timm's deit_base_distilled_patch16_384 and swaps in these two parts.
        self.v = VisionTransformerDistilled(img_size=32, patch_size=16, embed_dim=embed_dim, depth=depth,
                                            num_heads=num_heads, num_classes=1000)
        self.v.patch_embed.proj = nn.Conv2d(1, embed_dim, kernel_size=(16, 16), stride=(10, 10))
        f_dim, t_dim = (input_fdim - 16) // 10 + 1, (input_tdim - 16) // 10 + 1
        self.v.pos_embed = nn.Parameter(torch.randn(1, f_dim * t_dim + 2, embed_dim) * 0.02)
        self.mlp_head = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, label_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # input [B, T, F] as the release's dataloader gives it
        x = x.unsqueeze(1).transpose(2, 3)
        b = x.shape[0]
        x = self.v.patch_embed.proj(x).flatten(2).transpose(1, 2)
        cls_tokens = self.v.cls_token.expand(b, -1, -1)
        dist_token = self.v.dist_token.expand(b, -1, -1)
        x = torch.cat((cls_tokens, dist_token, x), dim=1) + self.v.pos_embed
        x = self.v.pos_drop(x)
        for blk in self.v.blocks:
            x = blk(x)
        x = self.v.norm(x)
        x = (x[:, 0] + x[:, 1]) / 2
        return self.mlp_head(x)


def release_pth(path: Path, *, label_dim: int = 10, seed: int = 1) -> ReleaseAST:
    """Write a release-layout .pth (as torch.save(DataParallel(model).state_dict())); returns the model."""
    torch.manual_seed(seed)
    model = ReleaseAST(label_dim, embed_dim=128, depth=2, num_heads=2, input_tdim=FRAMES).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "mlp_head.0" in name:
                p.add_(0.1 * torch.randn_like(p))
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, str(path))
    return model


def release_fbank(wave: np.ndarray, mean: float, std: float, target: int = FRAMES) -> torch.Tensor:
    """ast src/dataloader.py ``_wav2fbank`` + normalization, for one clip: ``[T, F]``."""
    w = torch.from_numpy(wave)[None]
    w = w - w.mean()
    fbank = kaldi.fbank(w, htk_compat=True, sample_frequency=SR, use_energy=False, window_type="hanning",
                        num_mel_bins=128, dither=0.0, frame_shift=10)
    pad = target - fbank.shape[0]
    fbank = nn.functional.pad(fbank, (0, 0, 0, pad)) if pad > 0 else fbank[:target]
    return (fbank - mean) / (std * 2)
