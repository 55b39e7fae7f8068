"""model_ref.py - PyTorch reference of moe.h's tiny decoder-only transformer, dense and MoE,
for tests/test_model_golden.c. make_goldens.py calls main(); it also runs on its own:

    /usr/bin/python3 tests/ref/model_ref.py

Writes tests/ref/model_<case>.bin (format: golden.py) with the config, the initial weights
(moe_store names), inputs and targets (one target is -1: ignored), logits, the cross-entropy,
the aux loss, each MoE layer's router logits and top-k ids, every parameter gradient of
loss + aux, then 10 AdamW steps on the same batch: the objective, the cross-entropy, the aux
loss and the top-k ids of every MoE layer at each of the 11 forwards (before step 1 ... after
step 10), and the parameters after step 10.

The model is written from the documented math (moe.h's >>moe:model comment), not from the C:
    x = wte[token] (+ wpe[position]);
    per layer:  x += Wo . Attn(RMSNorm(x; ln1))      causal, softmax(q k^T / sqrt(hd)),
                                                     q | k | v = rows of wqkv, head h is the
                                                     contiguous slice [h hd, (h+1) hd) of each,
                                                     RoPE (rotate-half: i pairs with i + hd/2,
                                                     frequency theta^(-2i/hd)) on q and k
                x += FFN(RMSNorm(x; ln2))            dense SwiGLU w_down (silu(w_gate h) * w_up h)
                                                     or the MoE layer (make_goldens.moe_reference
                                                     over the B*T tokens of the batch at once)
    logits = RMSNorm(x; lnf) . wte^T                 tied head, RMSNorm without bias
    objective = mean cross-entropy over targets >= 0 + sum of the MoE layers' aux losses
AdamW is torch.optim.AdamW itself (lr 1e-2, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on
the 2-d and 3-d weights only: not on norms or biases), no clipping.

Routing margins: every routing decision at each of the 11 forwards (the k-th against the
(k+1)-th router logit of every token of every MoE layer) must differ by MARGIN or more,
otherwise the case is redrawn with the next seed, so C and PyTorch cannot route differently.
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_goldens as mg  # noqa: E402  (the MoE-layer reference, enums, NOTE)
from golden import GoldenWriter  # noqa: E402

OUT_DIR = os.path.dirname(os.path.abspath(__file__))
POS = {"learned": 0, "rope": 1}
MARGIN = 2e-3   # smallest allowed gap between the k-th and (k+1)-th router logit
STEPS = 10
ADAM = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def model_cfg(**over):
    c = dict(vocab=64, d=32, n_layers=2, n_heads=4, d_ff=32, pos="learned", rope_theta=10000.0,
             norm_eps=1e-5, moe_every=0, dense_first=0, B=2, T=16, final="all")
    moe = mg.default_cfg()
    moe.update(d=32, d_ff=12, E=4, k=2)
    c["moe"] = moe
    for key, v in over.items():
        if key == "moe":
            c["moe"].update(v)
        else:
            c[key] = v
    c["max_seq"] = c["T"]
    return c


def is_moe(c, l):
    return c["moe_every"] > 0 and l >= c["dense_first"] and (l - c["dense_first"]) % c["moe_every"] == 0


def param_shapes(c):
    """moe_store names and shapes, in the order moe_model_init declares them; decay flag"""
    d, V, F_ = c["d"], c["vocab"], c["d_ff"]
    out = [("wte", (V, d), 1)]
    if c["pos"] == "learned":
        out.append(("wpe", (c["max_seq"], d), 1))
    for l in range(c["n_layers"]):
        p = "l%d." % l
        out += [(p + "ln1.w", (d,), 0), (p + "attn.wqkv", (3 * d, d), 1),
                (p + "attn.wo", (d, d), 1), (p + "ln2.w", (d,), 0)]
        if is_moe(c, l):
            for name, shape in mg.param_shapes(c["moe"]):
                out.append((p + name, shape, int(len(shape) >= 2)))
        else:
            out += [(p + "ffn.w_gate", (1, F_, d), 1), (p + "ffn.w_up", (1, F_, d), 1),
                    (p + "ffn.w_down", (1, d, F_), 1)]
    out.append(("lnf.w", (d,), 0))
    return out


def init_params(c, rng):
    """Weights large enough that every part of the model matters: non-trivial norm weights,
    peaked attention, logits of a few units, routers with clear preferences."""
    d = c["d"]
    P = {}
    for name, shape, _ in param_shapes(c):
        if name.endswith(".w") and len(shape) == 1 and not name.endswith("router.w"):
            v = 1.0 + 0.1 * rng.standard_normal(shape)              # RMSNorm weights
        elif name == "wte":
            v = 0.25 * rng.standard_normal(shape)
        elif name == "wpe":
            v = 0.2 * rng.standard_normal(shape)
        elif name.endswith("attn.wqkv"):
            v = rng.standard_normal(shape) / math.sqrt(d)
        elif name.endswith("attn.wo"):
            v = 0.5 * rng.standard_normal(shape) / math.sqrt(d)
        elif name.endswith("router.w"):
            v = 0.3 * rng.standard_normal(shape)
        elif name.endswith("router.b") or name.endswith("b_up") or name.endswith("b_down"):
            v = 0.1 * rng.standard_normal(shape)
        elif len(shape) == 3:                                        # nn.Linear, fan-in last
            bound = 1.0 / math.sqrt(shape[2])
            v = rng.uniform(-bound, bound, shape)
        else:
            raise ValueError(name)
        P[name] = np.asarray(v, dtype=np.float32)
    return P


def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, theta):
    """x (B, NH, T, hd): rotate-half pairing (GPT-NeoX / HF LLaMA)"""
    T, hd = x.shape[2], x.shape[3]
    half = hd // 2
    inv = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


def attention(h, wqkv, wo, c):
    B, T, d = h.shape
    NH = c["n_heads"]
    hd = d // NH
    qkv = F.linear(h, wqkv)
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(B, T, NH, hd).transpose(1, 2) for i in range(3))
    if c["pos"] == "rope":
        q, k = rope(q, c["rope_theta"]), rope(k, c["rope_theta"])
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    s = s.masked_fill(~mask, float("-inf"))
    y = torch.softmax(s, -1) @ v
    return F.linear(y.transpose(1, 2).reshape(B, T, d), wo)


def forward(c, P, inputs, targets):
    """inputs, targets: LongTensor (B, T). Returns logits, cross-entropy, aux, per-layer MoE
    outputs (dicts of make_goldens.moe_reference)."""
    B, T = inputs.shape
    d, eps = c["d"], c["norm_eps"]
    x = P["wte"][inputs]
    if c["pos"] == "learned":
        x = x + P["wpe"][:T]
    aux = torch.zeros(())
    moe_out = {}
    for l in range(c["n_layers"]):
        p = "l%d." % l
        x = x + attention(rmsnorm(x, P[p + "ln1.w"], eps), P[p + "attn.wqkv"], P[p + "attn.wo"], c)
        h = rmsnorm(x, P[p + "ln2.w"], eps)
        if is_moe(c, l):
            sub = {"moe." + n[len(p + "moe."):]: v for n, v in P.items() if n.startswith(p + "moe.")}
            r = mg.moe_reference(c["moe"], sub, h.reshape(B * T, d), None)
            moe_out[l] = r
            aux = aux + r["aux_total"]
            ffn = r["y"].reshape(B, T, d)
        else:
            wg, wu, wd = (P[p + "ffn." + n][0] for n in ("w_gate", "w_up", "w_down"))
            ffn = F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)
        x = x + ffn
    logits = F.linear(rmsnorm(x, P["lnf.w"], eps), P["wte"])
    ce = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1), ignore_index=-1)
    return logits, ce, aux, moe_out


def routing_gap(c, moe_out):
    """smallest gap between the k-th and (k+1)-th router logit over every MoE layer and token
    (softmax is monotone: the same order as the probabilities)"""
    k, E = c["moe"]["k"], c["moe"]["E"]
    gap = math.inf
    for r in moe_out.values():
        z = np.sort(r["logits"].detach().numpy().astype(np.float64), axis=1)[:, ::-1]
        if k < E:
            gap = min(gap, float((z[:, k - 1] - z[:, k]).min()))
        if c["moe"]["balance"] == "switch" and E > 1:   # Switch's f uses the argmax
            gap = min(gap, float((z[:, 0] - z[:, 1]).min()))
    return gap


def run_case(c, seed):
    """one attempt: the whole golden content, or None when a routing margin is too small"""
    rng = np.random.default_rng(seed)
    B, T, V = c["B"], c["T"], c["vocab"]
    P_np = init_params(c, rng)
    inputs = rng.integers(0, V, (B, T))
    targets = np.concatenate([inputs[:, 1:], rng.integers(0, V, (B, 1))], 1)  # next token
    targets[B - 1, T // 2] = -1                                              # one ignored
    inp_t = torch.tensor(inputs, dtype=torch.long)
    tgt_t = torch.tensor(targets, dtype=torch.long)
    names = [n for n, _, _ in param_shapes(c)]
    decay = {n: f for n, _, f in param_shapes(c)}
    P = {n: mg.t32(P_np[n]).requires_grad_() for n in names}

    logits, ce, aux, moe_out = forward(c, P, inp_t, tgt_t)
    if routing_gap(c, moe_out) < MARGIN:
        return None
    grads = torch.autograd.grad(ce + aux, [P[n] for n in names], allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(P[n]) for g, n in zip(grads, names)]
    first = dict(logits=logits.detach(), ce=ce.detach(), aux=aux.detach(),
                 moe={l: r for l, r in moe_out.items()}, grads=dict(zip(names, grads)))

    opt = torch.optim.AdamW(
        [dict(params=[P[n] for n in names if decay[n]], weight_decay=ADAM["weight_decay"]),
         dict(params=[P[n] for n in names if not decay[n]], weight_decay=0.0)],
        lr=ADAM["lr"], betas=ADAM["betas"], eps=ADAM["eps"])
    traj = dict(loss=[], ce=[], aux=[], topk={l: [] for l in moe_out})
    for step in range(STEPS + 1):
        opt.zero_grad(set_to_none=False)
        logits_s, ce_s, aux_s, mo = forward(c, P, inp_t, tgt_t)
        if routing_gap(c, mo) < MARGIN:
            return None
        traj["loss"].append(float(ce_s + aux_s))
        traj["ce"].append(float(ce_s))
        traj["aux"].append(float(aux_s))
        for l, r in mo.items():
            traj["topk"][l].append(r["topk"])
        if step == STEPS:
            break
        (ce_s + aux_s).backward()
        opt.step()
    final = {n: P[n].detach().clone() for n in names}
    return dict(P_np=P_np, inputs=inputs, targets=targets, names=names, first=first,
                traj=traj, final=final)


def make_model(path, name, c, seed):
    for attempt in range(200):
        r = run_case(c, seed + 1000 * attempt)
        if r is not None:
            break
    else:
        raise RuntimeError("%s: no seed with clear routing margins" % name)
    mc = c["moe"]
    g = GoldenWriter(mg.NOTE)
    g.add("case", np.array([ord(ch) for ch in name], dtype=np.int32), "i32")
    ints = dict(vocab=c["vocab"], max_seq=c["max_seq"], d=c["d"], n_layers=c["n_layers"],
                n_heads=c["n_heads"], d_ff=c["d_ff"], pos=POS[c["pos"]], moe_every=c["moe_every"],
                dense_first=c["dense_first"], B=c["B"], T=c["T"], steps=STEPS,
                seed=seed + 1000 * attempt)
    moe_ints = dict(d_ff=mc["d_ff"], n_experts=mc["E"], top_k=mc["k"], n_shared=mc["n_shared"],
                    d_ff_shared=mc["d_ff_shared"], expert=mg.EXPERT[mc["expert"]],
                    activation=mg.ACT[mc["activation"]], expert_bias=mc["expert_bias"],
                    router=mg.ROUTER[mc["router"]], renormalize=mc["renormalize"],
                    router_bias=mc["router_bias"], balance=mg.BALANCE[mc["balance"]])
    floats = dict(rope_theta=c["rope_theta"], norm_eps=c["norm_eps"], lr=ADAM["lr"],
                  beta1=ADAM["betas"][0], beta2=ADAM["betas"][1], eps=ADAM["eps"],
                  weight_decay=ADAM["weight_decay"])
    moe_floats = dict(capacity_factor=mc["capacity_factor"], balance_coef=mc["balance_coef"],
                      z_coef=mc["z_coef"], importance_coef=mc["importance_coef"],
                      load_coef=mc["load_coef"], noise_eps=mc["noise_eps"])
    for key, v in ints.items():
        g.add("cfg." + key, np.int32(v), "i32")
    for key, v in moe_ints.items():
        g.add("cfg.moe." + key, np.int32(v), "i32")
    for key, v in floats.items():
        g.add("cfg." + key, np.float32(v), "f32")
    for key, v in moe_floats.items():
        g.add("cfg.moe." + key, np.float32(v), "f32")
    for n in r["names"]:
        g.add("param." + n, r["P_np"][n])
    g.add("inputs", r["inputs"], "i32")
    g.add("targets", r["targets"], "i32")
    first = r["first"]
    g.add("logits", first["logits"])
    g.add("ce", first["ce"])
    g.add("aux", first["aux"])
    for l, mo in first["moe"].items():
        g.add("l%d.router_logits" % l, mo["logits"])
        g.add("l%d.topk" % l, np.array(mo["topk"], dtype=np.int32), "i32")
        g.add("l%d.aux" % l, mo["aux_total"])
    for n in r["names"]:
        g.add("grad." + n, first["grads"][n])
    tr = r["traj"]
    g.add("traj.loss", np.array(tr["loss"], dtype=np.float32))
    g.add("traj.ce", np.array(tr["ce"], dtype=np.float32))
    g.add("traj.aux", np.array(tr["aux"], dtype=np.float32))
    for l, ids in tr["topk"].items():
        g.add("traj.l%d.topk" % l, np.array(ids, dtype=np.int32), "i32")   # (STEPS+1, N, k)
    keep = r["names"] if c["final"] == "all" else c["final"]
    for n in keep:
        g.add("final." + n, r["final"][n])
    size = g.save(path)
    return size, r, ints["seed"]


def model_cases():
    """name -> (config, seed)"""
    return [
        # (a) dense, learned positions, 2 layers
        ("dense", model_cfg(), 201),
        # (b) MoE in every layer: renormalised softmax top-2 of 4 SwiGLU experts, Mixtral
        # balance loss and z-loss, RoPE
        ("moe_rope", model_cfg(pos="rope", moe_every=1,
                               moe=dict(k=2, renormalize=1, balance="mixtral", balance_coef=0.05,
                                        z_coef=0.01)), 202),
        # (c) 3 layers: dense, MoE, dense (dense_first = 1, moe_every = 2); Switch top-1
        # without renormalisation plus one shared SwiGLU expert, Switch balance loss, z-loss,
        # learned positions. Final parameters of a selection only (file size).
        ("switch_shared", model_cfg(n_layers=3, moe_every=2, dense_first=1,
                                    moe=dict(k=1, renormalize=0, n_shared=1, d_ff_shared=16,
                                             balance="switch", balance_coef=0.05, z_coef=0.01),
                                    final=["wte", "l0.ffn.w_down", "l1.ln2.w", "l1.moe.router.w",
                                           "l1.moe.experts.w_gate", "l1.moe.experts.w_up",
                                           "l1.moe.experts.w_down", "l1.moe.shared.w_gate",
                                           "l1.moe.shared.w_up", "l1.moe.shared.w_down", "lnf.w"]),
         203),
    ]


def main():
    total = 0
    for name, c, seed in model_cases():
        size, r, used = make_model(os.path.join(OUT_DIR, "model_%s.bin" % name), name, c, seed)
        total += size
        tr = r["traj"]
        print("model_%s.bin: %d bytes, seed %d, %d params, loss %.6g -> %.6g (ce %.6g, aux %.6g)"
              % (name, size, used, sum(v.size for v in r["P_np"].values()), tr["loss"][0],
                 tr["loss"][-1], tr["ce"][0], tr["aux"][0]))
    return total


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
