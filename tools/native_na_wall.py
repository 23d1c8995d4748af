"""NA 7x7 on 64x64, 4 heads, d 32, batch 1, float32, wall clock with torch's threads, interleaved rounds (foveal.bench.timing):
the native neighbourhood kernel against the eager cpu backend, dense SDPA, NATTEN's CPU forward and (--flex) compiled flex.

PYTHONPATH=src python tools/native_na_wall.py [--flex]  (after python -m foveal.kernels.native.build)
"""
import sys, warnings, torch, torch.nn.functional as F
from foveal import Neighborhood, attend
from foveal.bench.timing import time_interleaved, load
from foveal.kernels.native.neighborhood import native_neighborhood_attention as nna
warnings.simplefilter("ignore")
torch.manual_seed(0)
flex = "--flex" in sys.argv
p = Neighborhood((64, 64), 7)
B, H, N, D = 1, 4, 64 * 64, 32
q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
import natten.functional as nf
qn, kn, vn = (t.transpose(1, 2).reshape(B, 64, 64, H, D).contiguous() for t in (q, k, v))
go = torch.randn(B, H, N, D)

def fb(fn):
    def run():
        out = fn()
        out.backward(go)
        qg.grad = kg.grad = vg.grad = None
    return run

fwd = {
    "native": lambda: nna(q, k, v, p, need_lse=False),
    "cpu": lambda: attend(q, k, v, p, backend="cpu"),
    "sdpa_dense": lambda: F.scaled_dot_product_attention(q, k, v),
    "natten_cpu": lambda: nf.na2d(qn, kn, vn, kernel_size=7),
}
if flex:
    fwd["flex_compiled"] = lambda: attend(q, k, v, p, backend="flex")
bwd = {
    "native_fb": fb(lambda: nna(qg, kg, vg, p, need_lse=False)),
    "cpu_fb": fb(lambda: attend(qg, kg, vg, p, backend="cpu")),
    "sdpa_dense_fb": fb(lambda: F.scaled_dot_product_attention(qg, kg, vg)),
}
print("threads", torch.get_num_threads(), "load", load())
with torch.no_grad():
    rf = time_interleaved(fwd, "cpu", min_runs=5, max_runs=30, min_seconds=1.0, memory=False, keep=False, together=True)
rb = time_interleaved(bwd, "cpu", min_runs=5, max_runs=20, min_seconds=1.0, memory=False, keep=False, together=True)
print("load", load())
for name, r in {**rf, **rb}.items():
    print(f"{name:15s} first {r['first_s']*1e3:9.1f} ms  median {r['median_s']*1e3:9.2f} ms  runs {r['runs']}")
n = rf["native"]["median_s"]
for other in rf:
    print(f"native fwd / {other}: {n / rf[other]['median_s']:.4f}")
nb = rb["native_fb"]["median_s"]
for other in rb:
    print(f"native fwd+bwd / {other}: {nb / rb[other]['median_s']:.4f}")
