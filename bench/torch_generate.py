#!/usr/bin/python3
"""bench/torch_generate.py - the PyTorch peer of bench/generate.c (CPU, float32, no grad).

The same byte-level MoE transformer as bench/torch_train_lm.py (RMSNorm pre-norm blocks, causal
multi-head attention, learned positions, the MoE FFN with per-expert weights grouped by one
argsort, the tied head), generating the way Hugging Face's generate does with a KV cache: one
forward over the prompts fills past_key_values, then each step runs the newest token of every
sequence through the model with the cached keys and values (torch.cat per layer, as the
DynamicCache does), samples with softmax at temperature 1 and torch.multinomial, and appends.

    demo   d=128 L=4 heads=4, 8 SwiGLU experts of width 256, top-2 renormalised
    d256   d=256 L=4 heads=4, 8 experts of width 512, top-2

Lines (median of 5 runs after one warm-up; prompts of 16 random bytes, 240 new tokens):
    bench=torch_generate config=C setting=S batch=1|16 threads=P prompt=16 new=240 median_ms= tokens_per_s=
    bench=torch_generate_ctx config=C setting=S context=L ms_per_token=     (batch 1, median of 21)

Settings as bench/torch_train_lm.py (tuned: torch.set_num_threads(2), OMP_WAIT_POLICY=PASSIVE,
OPENBLAS_CORETYPE=SkylakeX on AVX-512 machines; default: none of those).

--batch1: batch 1 only (the quick A/B beside bench/generate --batch1).

Usage: /usr/bin/python3 bench/torch_generate.py [demo|d256] [--setting=tuned|default|both] [--batch1]
"""
import os
import sys

from torch_settings import dispatch

CONFIGS = [("demo", 128, 256), ("d256", 256, 512)]
LAYERS, HEADS, V, E, K, MAXLEN = 4, 4, 256, 8, 2, 256
PROMPT, NEW, REPS = 16, 240, 5


def parse_args(argv):
    only, setting = None, "both"
    for a in argv:
        if a == "--batch1":
            os.environ["BENCH_BATCH1"] = "1"  # the dispatched child reads it
        elif a.startswith("--setting="):
            setting = a.split("=", 1)[1]
        else:
            only = a
    return only, setting


def run(only, setting):
    import statistics
    import time

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    if setting == "tuned":
        torch.set_num_threads(2)
    threads = torch.get_num_threads()
    print("bench=torch_generate_info setting=%s torch=%s threads=%d" % (setting, torch.__version__, threads), flush=True)

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

        def forward(self, x, past):
            b, t, d = x.shape
            q, k, v = self.qkv(x).split(d, dim=-1)
            q = q.view(b, t, self.nh, self.hd).transpose(1, 2)
            k = k.view(b, t, self.nh, self.hd).transpose(1, 2)
            v = v.view(b, t, self.nh, self.hd).transpose(1, 2)
            if past is not None:  # HF's DynamicCache.update: concatenate along the sequence
                k = torch.cat([past[0], k], dim=2)
                v = torch.cat([past[1], v], dim=2)
            s = (q * (1.0 / self.hd ** 0.5)) @ k.transpose(-2, -1)
            if t > 1:  # the prompt: causal mask over its own positions
                n = k.shape[2]
                mask = torch.ones(t, n, dtype=torch.bool).triu(n - t + 1)
                s = s.masked_fill(mask, float("-inf"))
            y = s.softmax(dim=-1) @ v
            return self.wo(y.transpose(1, 2).reshape(b, t, d)), (k, v)

    class MoE(nn.Module):
        def __init__(self, d, f):
            super().__init__()
            self.router = nn.Linear(d, E, bias=False)
            self.w_gate = nn.ParameterList([nn.Parameter(torch.randn(f, d) * 0.02) for _ in range(E)])
            self.w_up = nn.ParameterList([nn.Parameter(torch.randn(f, d) * 0.02) for _ in range(E)])
            self.w_down = nn.ParameterList([nn.Parameter(torch.randn(d, f) * 0.02) for _ in range(E)])

        def forward(self, x3):
            shape = x3.shape
            x = x3.reshape(-1, shape[-1])
            probs = self.router(x).softmax(dim=-1)
            topw, topi = probs.topk(K, dim=-1)
            topw = topw / topw.sum(dim=-1, keepdim=True)
            flat = topi.reshape(-1)
            order = flat.argsort(stable=True)
            token = order // K
            counts = torch.bincount(flat, minlength=E)
            xs = x.index_select(0, token)
            outs = []
            for e, xe in enumerate(torch.split(xs, counts.tolist())):
                if xe.shape[0] == 0:
                    continue
                h = F.silu(xe @ self.w_gate[e].t()) * (xe @ self.w_up[e].t())
                outs.append(h @ self.w_down[e].t())
            out = torch.cat(outs) * topw.reshape(-1)[order].unsqueeze(1)
            return torch.zeros_like(x).index_add_(0, token, out).view(shape)

    class Block(nn.Module):
        def __init__(self, d, f):
            super().__init__()
            self.ln1, self.ln2 = RMSNorm(d), RMSNorm(d)
            self.attn = Attention(d, HEADS)
            self.ffn = MoE(d, f)

        def forward(self, x, past):
            a, kv = self.attn(self.ln1(x), past)
            x = x + a
            return x + self.ffn(self.ln2(x)), kv

    class LM(nn.Module):
        def __init__(self, d, f):
            super().__init__()
            self.wte = nn.Embedding(V, d)
            self.wpe = nn.Embedding(MAXLEN, d)
            self.blocks = nn.ModuleList([Block(d, f) for _ in range(LAYERS)])
            self.lnf = RMSNorm(d)
            for p in self.parameters():
                if p.dim() >= 2:
                    nn.init.normal_(p, std=0.02)

        def forward(self, idx, past, start):
            pos = torch.arange(start, start + idx.shape[1])
            x = self.wte(idx) + self.wpe(pos)
            new = []
            for i, blk in enumerate(self.blocks):
                x, kv = blk(x, past[i] if past is not None else None)
                new.append(kv)
            return self.lnf(x[:, -1:]) @ self.wte.weight.t(), new

    def generate(model, prompts, gen):
        logits, past = model(prompts, None, 0)
        n = prompts.shape[1]
        out = []
        for step in range(NEW):
            probs = logits[:, -1].softmax(dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            out.append(nxt)
            if step + 1 == NEW:
                break
            logits, past = model(nxt, past, n)
            n += 1
        return torch.cat(out, dim=1)

    for name, d, f in CONFIGS:
        if only and only != name:
            continue
        torch.manual_seed(1234)
        model = LM(d, f).eval()
        g = torch.Generator().manual_seed(42)
        prompts = torch.randint(0, V, (16, PROMPT), generator=g)
        with torch.inference_mode():
            for B in (1,) if os.environ.get("BENCH_BATCH1") else (1, 16):
                times = []
                for r in range(REPS + 1):
                    gen = torch.Generator().manual_seed(100 + r)
                    t0 = time.perf_counter()
                    generate(model, prompts[:B], gen)
                    if r > 0:
                        times.append(time.perf_counter() - t0)
                ms = statistics.median(times) * 1e3
                print("bench=torch_generate config=%s setting=%s batch=%d threads=%d prompt=%d new=%d median_ms=%.2f "
                      "tokens_per_s=%.0f" % (name, setting, B, threads, PROMPT, NEW, ms, B * NEW / ms * 1e3), flush=True)
            for L in (16, 64, 128, 192, 255):
                ctx = torch.randint(0, V, (1, L), generator=g)
                _, past = model(ctx, None, 0)
                tok = torch.full((1, 1), 65, dtype=torch.long)
                times = []
                for r in range(21):
                    t0 = time.perf_counter()
                    model(tok, past, L)
                    times.append(time.perf_counter() - t0)
                print("bench=torch_generate_ctx config=%s setting=%s context=%d threads=%d ms_per_token=%.4f"
                      % (name, setting, L, threads, statistics.median(times) * 1e3), flush=True)


def main():
    only, setting = parse_args(sys.argv[1:])
    extra = [only] if only else []
    dispatch(os.path.abspath(__file__), extra, setting, lambda s: run(only, s))


if __name__ == "__main__":
    main()
