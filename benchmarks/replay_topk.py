"""Top-k and fp16 storage of teacher logits (view store): their effect on the KD loss, on synthetic
AudioSet-shaped logits (527 classes). Run: python benchmarks/replay_topk.py"""
import numpy as np
import torch

from cmkd.audio.views import ViewBatch
from cmkd.distill.losses import kl_divergence, log_probs
from cmkd.distill.view_store import pack_rows

torch.manual_seed(0)
N, C = 512, 527
for ml in (True, False):
    t = torch.randn(N, C) * 2 - 5  # AudioSet-like: most classes far below 0
    pos = torch.rand(N, C) < 0.004
    t[pos] += 8
    s = t + torch.randn(N, C)  # a student near the teacher
    v = ViewBatch(torch.ones(N), torch.arange(N), torch.zeros(N, 2, dtype=torch.long), torch.zeros(N, 2, dtype=torch.long))
    ref = kl_divergence(log_probs(t, ml, 1.0), log_probs(s, ml, 1.0)).item()
    out = [f"{'multi-label (sigmoid)' if ml else 'single-label (softmax)'}: KD loss fp32 {ref:.5f}"]
    for dtype, k in [("float16", 0), ("float16", 100), ("float16", 50), ("float16", 25), ("float16", 10)]:
        a = pack_rows([str(i) for i in range(N)], [0] * N, [v], [t], dtype, k)
        if "logits" in a:
            z = torch.from_numpy(a["logits"].astype(np.float32)); nbytes = a["logits"].nbytes
        else:
            z = torch.from_numpy(np.repeat(a["rest"][:, None].astype(np.float32), C, 1))
            z.scatter_(1, torch.from_numpy(a["topk_index"].astype(np.int64)), torch.from_numpy(a["topk_value"].astype(np.float32)))
            nbytes = a["topk_index"].nbytes + a["topk_value"].nbytes + a["rest"].nbytes
        kd = kl_divergence(log_probs(z, ml, 1.0), log_probs(s, ml, 1.0)).item()
        out.append(f"  {dtype} k={k or 'all'}: {nbytes / N:.0f} B/clip-view, KD loss {kd:.5f}, rel. error {abs(kd - ref) / ref:.2e}")
    print("\n".join(out))
