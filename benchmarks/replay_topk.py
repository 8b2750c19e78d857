"""Top-k and fp16 storage of teacher logits (view store): their effect on the KD loss, on synthetic
AudioSet-shaped logits (527 classes). Run: python benchmarks/replay_topk.py"""

import numpy as np
import torch

from cmkd.audio.views import ViewBatch
from cmkd.distill.losses import kl_divergence, log_probs
from cmkd.distill.view_store import pack_rows

N, C = 512, 527


def stored(arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, int]:
    """The logits a replay reads back from a shard's arrays, and their bytes per clip-view."""
    if "logits" in arrays:
        return torch.from_numpy(arrays["logits"].astype(np.float32)), arrays["logits"].nbytes // N
    z = torch.from_numpy(np.repeat(arrays["rest"][:, None].astype(np.float32), C, 1))
    z.scatter_(1, torch.from_numpy(arrays["topk_index"].astype(np.int64)),
               torch.from_numpy(arrays["topk_value"].astype(np.float32)))
    size = arrays["topk_index"].nbytes + arrays["topk_value"].nbytes + arrays["rest"].nbytes
    return z, size // N


def main() -> None:
    torch.manual_seed(0)
    for multilabel in (True, False):
        t = torch.randn(N, C) * 2 - 5  # AudioSet-like: most classes far below 0
        t[torch.rand(N, C) < 0.004] += 8
        s = t + torch.randn(N, C)  # a student near the teacher
        v = ViewBatch(torch.ones(N), torch.arange(N), torch.zeros(N, 2, dtype=torch.long),
                      torch.zeros(N, 2, dtype=torch.long))
        ref = kl_divergence(log_probs(t, multilabel, 1.0), log_probs(s, multilabel, 1.0)).item()
        print(f"{'multi-label (sigmoid)' if multilabel else 'single-label (softmax)'}: KD loss fp32 {ref:.5f}")
        for k in (0, 100, 50, 25, 10):
            z, size = stored(pack_rows([str(i) for i in range(N)], [0] * N, [v], [t], "float16", k))
            kd = kl_divergence(log_probs(z, multilabel, 1.0), log_probs(s, multilabel, 1.0)).item()
            print(f"  fp16 k={k or 'all'}: {size} B/clip-view, KD loss {kd:.5f}, rel. error {abs(kd - ref) / ref:.2e}")


if __name__ == "__main__":
    main()
