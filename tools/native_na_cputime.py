"""NA 7x7 on 64x64, 4 heads, d 32, batch 1, float32, single-thread CPU time (time.thread_time: what a loaded machine
takes from wall clock), medians of 7 interleaved rounds: native kernel vs the cpu backend, dense SDPA, compiled flex.

PYTHONPATH=src python tools/native_na_cputime.py  (after python -m foveal.kernels.native.build)
"""
import time, statistics, torch, torch.nn.functional as F, warnings
from foveal import Neighborhood, attend
from foveal.kernels.native.neighborhood import native_neighborhood_attention as nna
warnings.simplefilter("ignore")
torch.set_num_threads(1)
p = Neighborhood((64, 64), 7)
q, k, v = (torch.randn(1, 4, 4096, 32) for _ in range(3))
qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
go = torch.randn(1, 4, 4096, 32)
def fb(f):
    def r():
        f().backward(go); qg.grad = kg.grad = vg.grad = None
    return r
fns = {"native_fwd": lambda: nna(q, k, v, p, need_lse=False), "cpu_fwd": lambda: attend(q, k, v, p, backend="cpu"),
       "sdpa_dense_fwd": lambda: F.scaled_dot_product_attention(q, k, v),
       "flex_compiled_fwd": lambda: attend(q, k, v, p, backend="flex"),
       "native_fb": fb(lambda: nna(qg, kg, vg, p, need_lse=False)), "cpu_fb": fb(lambda: attend(qg, kg, vg, p, backend="cpu")),
       "sdpa_dense_fb": fb(lambda: F.scaled_dot_product_attention(qg, kg, vg))}
times = {n: [] for n in fns}
for n, f in fns.items():
    with torch.set_grad_enabled(n.endswith("fb")):
        f()
for _ in range(7):
    for n, f in fns.items():
        with torch.set_grad_enabled(n.endswith("fb")):
            s = time.thread_time(); f(); times[n].append(time.thread_time() - s)
med = {n: statistics.median(t) for n, t in times.items()}
for n, t in med.items(): print(f"{n:18s} {t*1e3:9.2f} ms")
for o in ("cpu_fwd", "sdpa_dense_fwd", "flex_compiled_fwd"):
    print(f"native fwd / {o}: {med['native_fwd']/med[o]:.4f}")
for o in ("cpu_fb", "sdpa_dense_fb"):
    print(f"native fwd+bwd / {o}: {med['native_fb']/med[o]:.4f}")
