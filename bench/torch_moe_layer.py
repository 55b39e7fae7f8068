#!/usr/bin/python3
"""bench/torch_moe_layer.py - the PyTorch peer of bench/moe_layer.c (CPU, float32).

The same layer written the way a PyTorch user would: softmax top-k router with renormalised
weights and the Mixtral balance loss (coefficient 0.01), SwiGLU experts with one weight
tensor per expert, tokens grouped per expert with one argsort, gathered with index_select,
cut with torch.split, and the weighted outputs scattered back with one index_add_.

    small   T=4096 d=256 D=512  E=8  k=2
    medium  T=8192 d=512 D=1024 E=16 k=2
    fine    T=4096 d=512 D=256  E=64 k=8

Lines (medians of 7 timed runs after one warm-up; forward runs with autograd recording, as
in training, since moe_layer_forward always keeps its caches):
    bench=torch_moe_layer config=C pass=fwd|fwd_bwd setting=tuned|default threads=P median_ms= tokens_per_s= gflops=

Settings. tuned: torch.set_num_threads(2), OMP_WAIT_POLICY=PASSIVE, and on AVX-512 machines
OPENBLAS_CORETYPE=SkylakeX (Debian's OpenBLAS 0.3.21 may not recognise newer CPUs and fall
back to SSE3 kernels); the script re-executes itself with these variables when they are
missing. default: the same script with none of those variables and PyTorch's default thread
count ("out of the box"); it runs as a child process after the tuned one.

Usage: /usr/bin/python3 bench/torch_moe_layer.py [config] [--setting=tuned|default|both]
"""
import os
import sys

from torch_settings import dispatch

CONFIGS = [("small", 4096, 256, 512, 8, 2), ("medium", 8192, 512, 1024, 16, 2), ("fine", 4096, 512, 256, 64, 8)]
REPS = 7


def parse_args(argv):
    only, setting = None, "both"
    for a in argv:
        if a.startswith("--setting="):
            setting = a.split("=", 1)[1]
        else:
            only = a
    return only, setting


def run(only, setting):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    # MOE_TORCH_DEVICE=cuda: the same layer on the GPU (the peer of moe_layer --device cuda);
    # each timed call then ends with torch.cuda.synchronize()
    device = os.environ.get("MOE_TORCH_DEVICE", "cpu")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 GEMMs, as moe.h's cuBLAS calls
    if setting == "tuned":
        torch.set_num_threads(2)
    threads = torch.get_num_threads()
    print("bench=torch_moe_layer_info setting=%s torch=%s threads=%d OMP_WAIT_POLICY=%s OPENBLAS_CORETYPE=%s "
          "OMP_NUM_THREADS=%s" % (setting, torch.__version__, threads, os.environ.get("OMP_WAIT_POLICY", "unset"),
                                  os.environ.get("OPENBLAS_CORETYPE", "unset"),
                                  os.environ.get("OMP_NUM_THREADS", "unset")), flush=True)

    class MoE(nn.Module):
        def __init__(self, d, D, E, k):
            super().__init__()
            self.E, self.k = E, k
            self.router = nn.Linear(d, E, bias=False)
            nn.init.normal_(self.router.weight, std=0.02)
            b1, b2 = 1.0 / d ** 0.5, 1.0 / D ** 0.5
            self.w_gate = nn.ParameterList([nn.Parameter(torch.empty(D, d).uniform_(-b1, b1)) for _ in range(E)])
            self.w_up = nn.ParameterList([nn.Parameter(torch.empty(D, d).uniform_(-b1, b1)) for _ in range(E)])
            self.w_down = nn.ParameterList([nn.Parameter(torch.empty(d, D).uniform_(-b2, b2)) for _ in range(E)])

        def forward(self, x):
            T, E, k = x.shape[0], self.E, self.k
            probs = self.router(x).softmax(dim=-1)
            topw, topi = probs.topk(k, dim=-1)
            topw = topw / topw.sum(dim=-1, keepdim=True)
            flat = topi.reshape(-1)
            order = flat.argsort(stable=True)               # assignments grouped by expert
            token = order // k
            counts = torch.bincount(flat, minlength=E)
            xs = x.index_select(0, token)
            outs = []
            for e, xe in enumerate(torch.split(xs, counts.tolist())):
                h = F.silu(xe @ self.w_gate[e].t()) * (xe @ self.w_up[e].t())
                outs.append(h @ self.w_down[e].t())
            out = torch.cat(outs) * topw.reshape(-1)[order].unsqueeze(1)
            y = torch.zeros_like(x).index_add_(0, token, out)
            aux = 0.01 * E * (counts.to(x.dtype) / T * probs.mean(dim=0)).sum()   # Mixtral balance loss
            return y, aux

    import statistics
    import time

    for name, T, d, D, E, k in CONFIGS:
        if only and only != name:
            continue
        torch.manual_seed(1234)
        m = MoE(d, D, E, k).to(device)
        x = torch.randn(T, d).to(device).requires_grad_(True)
        dy = (torch.randn(T, d) / T).to(device)
        one = torch.ones((), device=device)
        params = list(m.parameters()) + [x]

        def fwd():
            return m(x)

        def fwd_bwd():
            y, aux = m(x)
            torch.autograd.backward([y, aux], [dy, one])

        flops_fwd = 2.0 * T * k * 3.0 * d * D + 2.0 * T * d * E
        for pas, fn, mult in (("fwd", fwd, 1.0), ("fwd_bwd", fwd_bwd, 3.0)):
            for p in params:
                p.grad = None
            fn()  # warm-up
            sync()
            times = []
            for _ in range(REPS):
                for p in params:
                    p.grad = None
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1e3
            print("bench=torch_moe_layer config=%s pass=%s setting=%s threads=%d median_ms=%.2f tokens_per_s=%.0f "
                  "gflops=%.1f%s" % (name, pas, setting, threads, ms, T / ms * 1e3, mult * flops_fwd / ms * 1e-6,
                                     " device=cuda" if device == "cuda" else ""),
                  flush=True)


def main():
    only, setting = parse_args(sys.argv[1:])
    dispatch(os.path.abspath(__file__), [only] if only else [], setting, lambda s: run(only, s))


if __name__ == "__main__":
    main()
