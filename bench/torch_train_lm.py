#!/usr/bin/python3
"""bench/torch_train_lm.py - the PyTorch peer of bench/train_lm.c (CPU, float32).

The same byte-level transformer written the way a PyTorch user would: nn.Embedding for tokens
and learned positions, pre-norm blocks with RMSNorm, causal multi-head attention, a dense
SwiGLU FFN or an MoE FFN, a final RMSNorm and the tied LM head; cross-entropy plus the MoE
layers' balance losses; torch.optim.AdamW (decay on matrices and embeddings, not on norms).

    dense  d=256 L=4 heads=4 seq=256 batch=8, dense SwiGLU d_ff=1024
    moe    8 SwiGLU experts of width 512, top-2, softmax router renormalised (Mixtral),
           Mixtral balance loss 0.01; per-expert weights, tokens grouped by one argsort,
           gathered with index_select, cut with torch.split, scattered back with index_add_

Attention: this torch (1.13) has no F.scaled_dot_product_attention; the explicit form
(q scaled first, q k^T, masked_fill with a cached causal mask, softmax, @ v) is used; --attn
picks another form for comparison (baddbmm: the scale folded into baddbmm with a -inf bias).
AdamW: foreach=True (the multi-tensor path; measured faster than the per-tensor loop here;
this torch has no fused CPU AdamW).

Line (median of 7 timed steps after 2 warm-up steps; a step is zero_grad + forward +
backward + optimizer step):
    bench=torch_train_lm config=C setting=tuned|default threads=P tokens=N median_ms= tokens_per_s=

Settings as bench/torch_moe_layer.py: tuned = torch.set_num_threads(2), OMP_WAIT_POLICY=PASSIVE,
OPENBLAS_CORETYPE=SkylakeX on AVX-512 machines (the script re-executes itself with them);
default = none of those variables, PyTorch's own thread count ("out of the box").

Usage: /usr/bin/python3 bench/torch_train_lm.py [dense|moe] [--setting=tuned|default|both]
       [--attn=explicit|baddbmm] [--foreach=0|1]
"""
import os
import sys

from torch_settings import dispatch

B, T, D_MODEL, LAYERS, HEADS, V = 8, 256, 256, 4, 4, 256
CONFIGS = [("dense", 0), ("moe", 1)]
WARMUP, REPS = 2, 7


def parse_args(argv):
    only, setting, attn, foreach = None, "both", "explicit", 1
    for a in argv:
        if a.startswith("--setting="):
            setting = a.split("=", 1)[1]
        elif a.startswith("--attn="):
            attn = a.split("=", 1)[1]
        elif a.startswith("--foreach="):
            foreach = int(a.split("=", 1)[1])
        else:
            only = a
    return only, setting, attn, foreach


def run(only, setting, attn, foreach):
    import statistics
    import time

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    if setting == "tuned":
        torch.set_num_threads(2)
    threads = torch.get_num_threads()
    print("bench=torch_train_lm_info setting=%s torch=%s threads=%d attn=%s foreach=%d OMP_WAIT_POLICY=%s "
          "OPENBLAS_CORETYPE=%s" % (setting, torch.__version__, threads, attn, foreach,
                                    os.environ.get("OMP_WAIT_POLICY", "unset"),
                                    os.environ.get("OPENBLAS_CORETYPE", "unset")), flush=True)

    class RMSNorm(nn.Module):
        def __init__(self, d, eps=1e-5):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    class Attention(nn.Module):
        def __init__(self, d, nh):
            super().__init__()
            self.nh, self.hd = nh, d // nh
            self.qkv = nn.Linear(d, 3 * d, bias=False)
            self.wo = nn.Linear(d, d, bias=False)
            self.register_buffer("mask", torch.ones(T, T, dtype=torch.bool).triu(1), persistent=False)
            self.register_buffer("bias", torch.zeros(T, T).masked_fill(self.mask, float("-inf")), persistent=False)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(x).split(d, dim=-1)
            q = q.view(b, t, self.nh, self.hd).transpose(1, 2)
            k = k.view(b, t, self.nh, self.hd).transpose(1, 2)
            v = v.view(b, t, self.nh, self.hd).transpose(1, 2)
            scale = 1.0 / self.hd ** 0.5
            if attn == "baddbmm":
                qf, kf = q.reshape(b * self.nh, t, self.hd), k.reshape(b * self.nh, t, self.hd)
                s = torch.baddbmm(self.bias[:t, :t].expand(b * self.nh, t, t), qf, kf.transpose(1, 2), alpha=scale)
                p = s.softmax(dim=-1)
                y = torch.bmm(p, v.reshape(b * self.nh, t, self.hd)).view(b, self.nh, t, self.hd)
            else:
                s = (q * scale) @ k.transpose(-2, -1)
                p = s.masked_fill(self.mask[:t, :t], float("-inf")).softmax(dim=-1)
                y = p @ v
            return self.wo(y.transpose(1, 2).reshape(b, t, d))

    class SwiGLU(nn.Module):
        def __init__(self, d, f):
            super().__init__()
            self.gate = nn.Linear(d, f, bias=False)
            self.up = nn.Linear(d, f, bias=False)
            self.down = nn.Linear(f, d, bias=False)

        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * self.up(x)), None

    class MoE(nn.Module):
        def __init__(self, d, f, E, k):
            super().__init__()
            self.E, self.k = E, k
            self.router = nn.Linear(d, E, bias=False)
            self.w_gate = nn.ParameterList([nn.Parameter(torch.randn(f, d) * 0.02) for _ in range(E)])
            self.w_up = nn.ParameterList([nn.Parameter(torch.randn(f, d) * 0.02) for _ in range(E)])
            self.w_down = nn.ParameterList([nn.Parameter(torch.randn(d, f) * 0.02) for _ in range(E)])

        def forward(self, x3):
            shape = x3.shape
            x = x3.reshape(-1, shape[-1])
            n, E, k = x.shape[0], self.E, self.k
            probs = self.router(x).softmax(dim=-1)
            topw, topi = probs.topk(k, dim=-1)
            topw = topw / topw.sum(dim=-1, keepdim=True)
            flat = topi.reshape(-1)
            order = flat.argsort(stable=True)
            token = order // k
            counts = torch.bincount(flat, minlength=E)
            xs = x.index_select(0, token)
            outs = []
            for e, xe in enumerate(torch.split(xs, counts.tolist())):
                h = F.silu(xe @ self.w_gate[e].t()) * (xe @ self.w_up[e].t())
                outs.append(h @ self.w_down[e].t())
            out = torch.cat(outs) * topw.reshape(-1)[order].unsqueeze(1)
            y = torch.zeros_like(x).index_add_(0, token, out)
            aux = 0.01 * E * (counts.to(x.dtype) / n * probs.mean(dim=0)).sum()
            return y.view(shape), aux

    class Block(nn.Module):
        def __init__(self, moe):
            super().__init__()
            self.ln1, self.ln2 = RMSNorm(D_MODEL), RMSNorm(D_MODEL)
            self.attn = Attention(D_MODEL, HEADS)
            self.ffn = MoE(D_MODEL, 512, 8, 2) if moe else SwiGLU(D_MODEL, 1024)

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            f, aux = self.ffn(self.ln2(x))
            return x + f, aux

    class LM(nn.Module):
        def __init__(self, moe):
            super().__init__()
            self.wte = nn.Embedding(V, D_MODEL)
            self.wpe = nn.Embedding(T, D_MODEL)
            self.blocks = nn.ModuleList([Block(moe) for _ in range(LAYERS)])
            self.lnf = RMSNorm(D_MODEL)
            for p in self.parameters():
                if p.dim() >= 2:
                    nn.init.normal_(p, std=0.02)
            self.register_buffer("pos", torch.arange(T), persistent=False)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(self.pos[: idx.shape[1]])
            aux = 0.0
            for blk in self.blocks:
                x, a = blk(x)
                if a is not None:
                    aux = aux + a
            logits = self.lnf(x) @ self.wte.weight.t()
            return F.cross_entropy(logits.view(-1, V), targets.view(-1)) + aux

    for name, moe in CONFIGS:
        if only and only != name:
            continue
        torch.manual_seed(1234)
        model = LM(moe)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        kw = {"foreach": True} if foreach else {}
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=3e-4, **kw)
        g = torch.Generator().manual_seed(42)
        times = []
        for r in range(WARMUP + REPS):
            data = torch.randint(0, 256, (B, T + 1), generator=g)
            idx, tgt = data[:, :-1].contiguous(), data[:, 1:].contiguous()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = model(idx, tgt)
            loss.backward()
            opt.step()
            if r >= WARMUP:
                times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        print("bench=torch_train_lm config=%s setting=%s threads=%d tokens=%d median_ms=%.2f tokens_per_s=%.0f "
              "loss=%.4f params=%d" % (name, setting, threads, B * T, ms, B * T / ms * 1e3, loss.item(),
                                       sum(p.numel() for p in model.parameters())), flush=True)


def main():
    only, setting, attn, foreach = parse_args(sys.argv[1:])
    extra = ([only] if only else []) + ["--attn=" + attn, "--foreach=%d" % foreach]
    dispatch(os.path.abspath(__file__), extra, setting, lambda s: run(only, s, attn, foreach))


if __name__ == "__main__":
    main()
