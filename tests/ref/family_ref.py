"""family_ref.py - PyTorch references of moe.h's four newer router families, for
tests/test_family_golden.c. make_goldens.py calls main(); it also runs on its own:

    /usr/bin/python3 tests/ref/family_ref.py
    /usr/bin/python3 tests/ref/family_ref.py rmoe_<case> ...   (only those files)

Writes, under tests/ref/ (format: golden.py):
    family_<case>.bin  one MoE layer (AoE, GW-MoE, HyperMoE): config, initial weights (moe_store
                       names), x, dy; router logits, probabilities, dense gates, top-k ids, the
                       GW-MoE uncertain flags, y, routing counts, aux losses; every gradient of
                       sum(y * dy) + aux_total, and separately of aux_total alone.
    rmoe_<case>.bin    the whole tiny model with RMoE's GRU router through depth (and its NP,
                       detach and MLP-router ablations): logits, losses, each MoE layer's router
                       input / logits / top-k ids / aux, every parameter gradient, and (GRU case)
                       5 AdamW steps on the same batch.

Written from the math (methods/moe-methods.md sections 2-5) and moe.h's documented semantics,
not from moe.h's C code:
  AoE      C_e = x W_in_e^T (rank r), logits = ||C_e||_2, p = softmax(logits), top-k by norm;
           paper weights: softmax over the k chosen norms (= p_I / sum p_I); official-code
           weights: p_I as they are. Chosen expert e: SiLU(C_e W_out_e^T) * (x W_up_e^T), then
           W_down_e. Balance loss alpha N sum_i f_i P_i, f_i = picks_i / T, P = mean softmax of
           the norms (the HF-Mixtral form).
  GW-MoE   u_t = -sum_e p_e ln(p_e + 1e-5) (nats, divided by ln E when normalised); while the
           layer is active a token with u_t >= tau is uncertain, except that with a slot cap M
           only the first M uncertain tokens of each sequence (seq_len tokens) count. Paper:
           y_t = sum_e p_e E_e(x_t) (gates = the full softmax, no capacity). Released code:
           y_t = p_{E-1} x_t (the experts skipped, gates 0). The balance loss still counts every
           token's top-k (f is a constant); the routing counts (requested / kept / dropped /
           load) leave the broadcast tokens out.
  HyperMoE (hyper_head_bias: each generated W_dn, b_dn, W_up, b_up plus a learned constant, the
           official code's nn.Linear head biases)
           sigma_t = sum of Q_j over the experts t did NOT choose; c_t = proc2(ReLU(proc1(sigma)));
           hb_t = ReLU(net([c_t ; layer_emb[l]])); the per-token adapter is generated
           explicitly: W_dn(t)[j] = sum_k hb_k head_down[j b + k] (a x d), b_dn(t)[j] =
           sum_k head_down_b[j, k] hb_k, W_up(t)[:, j] = sum_k hb_k head_up[:, j b + k],
           b_up(t) = sum_k hb_k head_up[:, a b + k]; y += W_up(t) ReLU(W_dn(t) x + b_dn(t)) + b_up(t).
  RMoE     per MoE layer l: x'_l = x_l P_l^T; h_l = GRUCell(x'_l, h_{l-1}) (torch.nn.GRUCell
           itself, its weights copied into "rmoe.gru.*"), h_0 = 0, dense layers pass h on;
           router logits = h_l Wr^T, experts read x_l. NP: h_{l-1} := 0; detach: h_{l-1}.detach();
           MLP: router on GELU(x'_l). balance_all_layers: ONE balance loss over all MoE
           layers' tokens (HF's load_balancing_loss_func on the concatenated router logits,
           as RMoE's code): coef E sum_i mean_l(f_l)_i mean_l(P_l)_i, replacing the layers' own.
Every gradient comes from autograd. Routing decisions (top-k, uncertain flags) are python
constants; inputs are redrawn until each has a clear margin (no near-ties among the top k + 1
logits, no entropy near tau, no ReLU pre-activation near 0 in the hyper-expert), checked on a
float64 run of the same reference.
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_goldens as mg  # noqa: E402  (enums, NOTE, order_desc)
import model_ref as mr  # noqa: E402  (rmsnorm, attention of the tiny model)
from golden import GoldenWriter  # noqa: E402

OUT_DIR = os.path.dirname(os.path.abspath(__file__))
ROUTER = dict(mg.ROUTER, aoe=4)
RIN = {"direct": 0, "gru": 1, "gru_np": 2, "gru_detach": 3, "mlp": 4}
HYPER_KEYS = ("hyper_embed", "hyper_hidden", "hyper_cond", "hyper_layer_dim", "hyper_width",
              "hyper_adapter", "hyper_layers", "hyper_layer")


def fam_cfg(**over):
    c = mg.default_cfg()
    c.update(aoe_rank=0, gw_threshold=0.0, gw_normalized=0, gw_slots=0, gw_released=0,
             gw_active=0, seq_len=0, hyper=0, hyper_embed=8, hyper_hidden=8, hyper_cond=6,
             hyper_layer_dim=3, hyper_width=6, hyper_adapter=5, hyper_layers=2, hyper_layer=1,
             hyper_head_bias=0)
    c.update(over)
    return c


def param_shapes(c, prefix="moe.", router_dim=None):
    """moe_store names and shapes of one layer (routed SwiGLU experts, no shared bank)"""
    E, d, D, r = c["E"], c["d"], c["d_ff"], c["aoe_rank"]
    assert c["n_shared"] == 0 and c["expert"] == "swiglu"
    out = []
    if c["router"] == "aoe":
        out += [(prefix + "experts.w_gate_in", (E, r, d)), (prefix + "experts.w_gate_out", (E, D, r))]
    else:
        out.append((prefix + "router.w", (E, router_dim or d)))
    if c["router_bias"]:
        out.append((prefix + "router.b", (E,)))
    if c["router"] != "aoe":
        out.append((prefix + "experts.w_gate", (E, D, d)))
    out += [(prefix + "experts.w_up", (E, D, d)), (prefix + "experts.w_down", (E, d, D))]
    if c["hyper"]:
        e, h, q = c["hyper_embed"], c["hyper_hidden"], c["hyper_cond"]
        lam, b, a = c["hyper_layer_dim"], c["hyper_width"], c["hyper_adapter"]
        out += [(prefix + "hyper.expert_emb", (E, e)), (prefix + "hyper.proc1.w", (h, e)),
                (prefix + "hyper.proc1.b", (h,)), (prefix + "hyper.proc2.w", (q, h)),
                (prefix + "hyper.proc2.b", (q,)),
                ("hyper.layer_emb", (c["hyper_layers"], lam)), ("hyper.net.w", (b, q + lam)),
                ("hyper.net.b", (b,)), ("hyper.head_down", (a * b, d)),
                ("hyper.head_down_b", (a, b)), ("hyper.head_up", (d, (a + 1) * b))]
        if c["hyper_head_bias"]:  # the official code's heads are nn.Linear with biases
            out += [("hyper.head_down.bias", (a, d)), ("hyper.head_down_b.bias", (a,)),
                    ("hyper.head_up.bias", (d, a + 1))]
    return out


def init_params(c, rng, skew=None, prefix="moe."):
    """weights that make every part matter: the hyper-expert's heads are O(1), not 1e-3"""
    P = {}
    for name, shape in param_shapes(c, prefix):
        base = name[len(prefix):] if name.startswith(prefix) else name
        if base == "router.w":
            v = c.get("router_scale", 0.5) * rng.standard_normal(shape)
        elif base == "router.b":
            v = 0.3 * rng.standard_normal(shape) + (skew if skew is not None else 0.0)
        elif base == "experts.w_gate_in":   # norms of a few units, well separated
            v = rng.standard_normal(shape) / math.sqrt(shape[2]) * c.get("aoe_scale", 1.0)
        elif base.endswith("emb"):
            v = rng.standard_normal(shape)
        elif base in ("hyper.proc1.b", "hyper.proc2.b", "hyper.net.b"):
            v = 0.3 * rng.standard_normal(shape)
        elif base == "hyper.head_down":      # W_dn(t) x of order 1
            v = 1.5 * rng.standard_normal(shape) / math.sqrt(c["d"] * c["hyper_width"])
        elif base == "hyper.head_down_b":
            v = 0.5 * rng.standard_normal(shape) / math.sqrt(c["hyper_width"])
        elif base == "hyper.head_up":        # hyper output comparable to the experts'
            v = 1.0 * rng.standard_normal(shape) / math.sqrt(c["hyper_width"] * c["hyper_adapter"])
        elif base == "hyper.head_down.bias":  # the heads' biases: constants of the same order
            v = 0.5 * rng.standard_normal(shape) / math.sqrt(c["d"])
        elif base == "hyper.head_down_b.bias":
            v = 0.3 * rng.standard_normal(shape)
        elif base == "hyper.head_up.bias":
            v = 0.5 * rng.standard_normal(shape) / math.sqrt(c["hyper_adapter"])
        elif len(shape) >= 2:                # nn.Linear, fan-in last
            bound = 1.0 / math.sqrt(shape[-1])
            v = rng.uniform(-bound, bound, shape)
        else:
            raise ValueError(name)
        P[name] = np.asarray(v, dtype=np.float32)
    return P


def gw_entropy(p):
    """the released code's routing entropy, float64, from the probabilities (T, E)"""
    p = p.detach().double()
    return -(p * torch.log(p + 1e-5)).sum(-1)


# ------------------------------------------------------------------------------------------
# one layer: AoE / GW-MoE / HyperMoE on top of the softmax top-k router
# ------------------------------------------------------------------------------------------

def layer_ref(c, P, x, prefix="moe.", rin=None):
    """P: name -> tensor (any float dtype). rin: the router's input (RMoE / MLP), else x.
    Returns outputs; routing decisions as python lists, every float a differentiable tensor."""
    T, E, k, d = x.shape[0], c["E"], c["k"], c["d"]
    W = lambda n: P[prefix + n]  # noqa: E731
    out = {}
    if c["router"] == "aoe":
        C = torch.einsum("td,erd->ter", x, W("experts.w_gate_in"))        # (T, E, r)
        z = torch.linalg.vector_norm(C, dim=-1)
    else:
        z = F.linear(x if rin is None else rin, W("router.w"), P.get(prefix + "router.b"))
    probs = torch.softmax(z, -1)
    lse = torch.logsumexp(z, -1)
    out.update(logits=z, probs=probs)
    pl = probs.detach().tolist()
    topk = [mg.order_desc(pl[t])[:k] for t in range(T)]

    # GW-MoE: uncertain tokens, in sequence order with the per-sequence slot cap
    u = gw_entropy(probs)
    if c["gw_normalized"]:
        u = u / math.log(E)
    out["entropy"] = u
    uncertain = [0] * T
    if c["gw_active"] and c["gw_threshold"] > 0:
        seq = c["seq_len"] or T
        used = 0
        for t in range(T):
            if t % seq == 0:
                used = 0
            if float(u[t]) >= c["gw_threshold"] and (c["gw_slots"] == 0 or used < c["gw_slots"]):
                used += 1
                uncertain[t] = 1
    out["uncertain"] = uncertain

    # assignments (token, expert, weight), dense gates
    assign = []
    requested = [0] * E
    for t in range(T):
        for e in topk[t]:
            requested[e] += 1
    if c["capacity_factor"] > 0:
        C_cap = math.ceil(c["capacity_factor"] * k * T / E)
        count, keep = [0] * E, set()
        for s in range(k):
            for t in range(T):
                if uncertain[t]:
                    continue
                e = topk[t][s]
                if count[e] < C_cap:
                    count[e] += 1
                    keep.add((t, s))
    bypass = []
    rows = []
    for t in range(T):
        if uncertain[t]:
            if c["gw_released"]:
                bypass.append(t)
                rows.append(torch.zeros(E, dtype=x.dtype))
            else:
                rows.append(probs[t])
                for e in range(E):
                    assign.append((t, e, probs[t, e], 1))
            continue
        w = probs[t, topk[t]]
        if c["renormalize"]:
            w = w / w.sum()
        row = torch.zeros(E, dtype=x.dtype).index_put((torch.tensor(topk[t]),), w)
        rows.append(row)
        for s, e in enumerate(topk[t]):
            if c["capacity_factor"] > 0 and (t, s) not in keep:
                continue
            assign.append((t, e, w[s], 0))
    gates = torch.stack(rows)
    out["gates"] = gates
    out["topk"] = topk

    # experts (SwiGLU; AoE's gate reuses the cache) and the combine
    y = torch.zeros_like(x)
    kept_per_expert = [0] * E
    bcast_per_expert = [0] * E
    for e in range(E):
        a_e = [a for a in assign if a[1] == e]
        kept_per_expert[e] = sum(1 for a in a_e if not a[3])
        bcast_per_expert[e] = sum(1 for a in a_e if a[3])
        if not a_e:
            continue
        tok = torch.tensor([a[0] for a in a_e])
        wts = torch.stack([a[2] for a in a_e])
        xs = x[tok]
        if c["router"] == "aoe":
            hg = F.linear(C[tok, e], W("experts.w_gate_out")[e])
        else:
            hg = F.linear(xs, W("experts.w_gate")[e])
        h = F.silu(hg) * F.linear(xs, W("experts.w_up")[e])
        y = y.index_add(0, tok, wts[:, None] * F.linear(h, W("experts.w_down")[e]))
    if bypass:  # released GW code: y_t = p_{E-1} x_t
        bt = torch.tensor(bypass)
        y = y.index_add(0, bt, probs[bt, E - 1][:, None] * x[bt])

    # HyperMoE: per-token generated adapter from the unselected experts' embeddings
    if c["hyper"]:
        a_, b_ = c["hyper_adapter"], c["hyper_width"]
        unsel = torch.tensor([[0.0 if gates[t, e].item() != 0.0 else 1.0 for e in range(E)]
                              for t in range(T)], dtype=x.dtype)
        sig = unsel @ W("hyper.expert_emb")
        pre1 = F.linear(sig, W("hyper.proc1.w"), W("hyper.proc1.b"))
        cond = F.linear(F.relu(pre1), W("hyper.proc2.w"), W("hyper.proc2.b"))
        lemb = P["hyper.layer_emb"][c["hyper_layer"]]
        zc = torch.cat([cond, lemb.expand(T, -1)], 1)
        pre_hb = F.linear(zc, P["hyper.net.w"], P["hyper.net.b"])
        hb = F.relu(pre_hb)                                                  # (T, b)
        hd = P["hyper.head_down"].reshape(a_, b_, d)
        hu = P["hyper.head_up"]
        W_dn = torch.einsum("tk,jkd->tjd", hb, hd)                           # (T, a, d)
        b_dn = hb @ P["hyper.head_down_b"].t()                               # (T, a)
        W_up = torch.einsum("tk,mjk->tmj", hb, hu[:, :a_ * b_].reshape(d, a_, b_))  # (T, d, a)
        b_up = hb @ hu[:, a_ * b_:].t()                                      # (T, d)
        if c["hyper_head_bias"]:  # each head's own bias: a constant on what it generates
            W_dn = W_dn + P["hyper.head_down.bias"]
            b_dn = b_dn + P["hyper.head_down_b.bias"]
            W_up = W_up + P["hyper.head_up.bias"][:, :a_]
            b_up = b_up + P["hyper.head_up.bias"][:, a_]
        pre_u = torch.einsum("tjd,td->tj", W_dn, x) + b_dn
        hyp = torch.einsum("tmj,tj->tm", W_up, F.relu(pre_u)) + b_up
        y = y + hyp
        out["hyper_out"] = hyp
        out["hyper_pre"] = torch.cat([pre1, pre_hb, pre_u], 1)
    out["y"] = y

    # auxiliary losses: balance over every token's top-k, z-loss on the (norm) logits
    Pm = probs.mean(0)
    if c["balance"] == "switch":
        f = torch.zeros(E, dtype=x.dtype)
        for t in range(T):
            f[topk[t][0]] += 1.0 / T
        balance = c["balance_coef"] * E * (f * Pm).sum()
    elif c["balance"] == "mixtral":
        f = torch.tensor(requested, dtype=x.dtype) / T
        balance = c["balance_coef"] * E * (f * Pm).sum()
    else:
        f = torch.zeros(E, dtype=x.dtype)
        balance = torch.zeros((), dtype=x.dtype)
    zloss = c["z_coef"] * (lse ** 2).mean()
    out.update(aux_balance=balance, aux_z=zloss, aux_total=balance + zloss, balance_f=f)

    nb = sum(uncertain)
    kept = sum(kept_per_expert)
    out["broadcast"] = nb
    out["requested"] = sum(requested) - k * nb
    out["kept"] = kept
    out["dropped"] = out["requested"] - kept
    out["load"] = [n / kept if kept else 0.0 for n in kept_per_expert]
    out["mean_prob"] = Pm
    pd = probs.detach().double()
    out["gate_entropy"] = float(-(pd * torch.log(pd)).nan_to_num().sum(-1).mean())
    out["kept_per_expert"] = kept_per_expert
    return out


def routing_gap(z, k):
    """smallest gap among the top k + 1 logits of any token (float64 numpy (T, E))"""
    s = np.sort(z, axis=1)[:, ::-1]
    return (s[:, :k] - s[:, 1:k + 1]).min(axis=1) if s.shape[1] > k else np.full(len(z), np.inf)


def bad_tokens(c, P_np, x, margin=0.02):
    """run the reference in float64 and list the tokens without clear margins"""
    P64 = {n: torch.tensor(v, dtype=torch.float64) for n, v in P_np.items()}
    r = layer_ref(c, P64, torch.tensor(x, dtype=torch.float64))
    z = r["logits"].numpy()
    bad = set(np.nonzero(routing_gap(z, c["k"]) < margin)[0].tolist())
    if c["balance"] == "switch":
        bad |= set(np.nonzero(routing_gap(z, 1) < margin)[0].tolist())
    if c["gw_threshold"] > 0:
        bad |= set(np.nonzero(np.abs(r["entropy"].numpy() - c["gw_threshold"]) < 0.01)[0].tolist())
    if c["hyper"]:
        bad |= set(np.nonzero(np.abs(r["hyper_pre"].numpy()).min(1) < 1e-3)[0].tolist())
    return sorted(bad), r


def make_layer(path, name, c, T, seed, skew=None, checks=None):
    for attempt in range(50):
        rng = np.random.default_rng(seed + 1000 * attempt)
        P_np = init_params(c, rng, skew)
        x = rng.standard_normal((T, c["d"])).astype(np.float32)
        if c.get("tau_quantile") is not None:   # GW threshold at a quantile of the entropies
            _, r0 = bad_tokens(dict(c, gw_threshold=0.0), P_np, x)
            u = np.sort(r0["entropy"].numpy())
            i = int(round(c["tau_quantile"] * T))
            c["gw_threshold"] = float(np.float32(round(0.5 * (u[i - 1] + u[i]), 3)))
        for _ in range(2000):
            bad, r64 = bad_tokens(c, P_np, x)
            if not bad:
                break
            for t in bad:
                x[t] = rng.standard_normal(c["d"])
        else:
            continue
        if checks is None or checks(c, r64, T):
            break
    else:
        raise RuntimeError("%s: no inputs with clear margins" % name)
    dy = rng.standard_normal((T, c["d"])).astype(np.float32)

    P = {n: mg.t32(v).requires_grad_() for n, v in P_np.items()}
    xt = mg.t32(x).requires_grad_()
    r = layer_ref(c, P, xt)
    assert r["topk"] == r64["topk"] and r["uncertain"] == r64["uncertain"], name
    objective = (r["y"] * mg.t32(dy)).sum() + r["aux_total"]
    names = list(P)
    leaves = [xt] + [P[n] for n in names]
    grads = torch.autograd.grad(objective, leaves, retain_graph=True, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(v) for g, v in zip(grads, leaves)]
    aux_grads = torch.autograd.grad(r["aux_total"], leaves, allow_unused=True)

    g = GoldenWriter(mg.NOTE)
    g.add("case", np.array([ord(ch) for ch in name], dtype=np.int32), "i32")
    ints = dict(d=c["d"], d_ff=c["d_ff"], n_experts=c["E"], top_k=c["k"],
                router=ROUTER[c["router"]], renormalize=c["renormalize"],
                router_bias=c["router_bias"], balance=mg.BALANCE[c["balance"]], tokens=T,
                aoe_rank=c["aoe_rank"], gw_normalized=c["gw_normalized"],
                gw_slots=c["gw_slots"], gw_released=c["gw_released"], gw_active=c["gw_active"],
                seq_len=c["seq_len"], hyper=c["hyper"])
    ints.update({key: c[key] for key in HYPER_KEYS})
    if c["hyper_head_bias"]:  # recorded only where set: older files stay as they were
        ints["hyper_head_bias"] = 1
    floats = dict(capacity_factor=c["capacity_factor"], balance_coef=c["balance_coef"],
                  z_coef=c["z_coef"], gw_threshold=c["gw_threshold"])
    for key, v in ints.items():
        g.add("cfg." + key, np.int32(v), "i32")
    for key, v in floats.items():
        g.add("cfg." + key, np.float32(v), "f32")
    for n in names:
        g.add("param." + n, P_np[n])
    g.add("x", x)
    g.add("dy", dy)
    g.add("logits", r["logits"])
    g.add("probs", r["probs"])
    g.add("gates", r["gates"])
    g.add("topk", np.array(r["topk"], dtype=np.int32), "i32")
    g.add("uncertain", np.array(r["uncertain"], dtype=np.int32), "i32")
    g.add("y", r["y"])
    if c["hyper"]:
        g.add("hyper_out", r["hyper_out"])
    for key in ("aux_balance", "aux_z", "aux_total"):
        g.add(key, r[key])
    for key in ("broadcast", "requested", "kept", "dropped"):
        g.add("stats." + key, np.int32(r[key]), "i32")
    g.add("stats.load", np.array(r["load"], dtype=np.float32))
    g.add("stats.mean_prob", r["mean_prob"])
    g.add("stats.gate_entropy", np.float32(r["gate_entropy"]))
    g.add("grad.dx", grads[0])
    for n, gr in zip(names, grads[1:]):
        g.add("grad." + n, gr)
    g.add("aux_grad.dx", aux_grads[0] if aux_grads[0] is not None else torch.zeros_like(xt))
    for n, gr in zip(names, aux_grads[1:]):  # only the tensors the aux losses reach
        if gr is not None:
            g.add("aux_grad." + n, gr)
    size = g.save(path)
    return size, r


def layer_cases():
    """name -> (config, tokens, seed, router-bias skew, acceptance check, description)"""
    def gw_check(lo, hi, slots_bind=False, drops=False):
        def check(c, r, T):
            frac = sum(r["uncertain"]) / T
            ok = lo <= frac <= hi
            if slots_bind:  # the slot cap must turn some uncertain tokens away
                u = r["entropy"].numpy()
                ok = ok and int((u >= c["gw_threshold"]).sum()) > sum(r["uncertain"])
            if drops:
                ok = ok and r["dropped"] > 0
            return ok
        return check

    def hyper_check(c, r, T):  # the hyper-expert matters: comparable to the experts' output
        hy = r["hyper_out"].norm().item()
        return 0.2 < hy / max((r["y"] - r["hyper_out"]).norm().item(), 1e-9) < 5.0

    return [
        # AoE, paper weights: softmax over the k = 2 chosen norms; Mixtral-form balance on the
        # softmax of the norms, z-loss on the norms
        ("aoe_paper", fam_cfg(router="aoe", E=8, k=2, d=16, d_ff=24, aoe_rank=4, renormalize=1,
                              balance="mixtral", balance_coef=0.05, z_coef=0.01, aoe_scale=1.5),
         40, 301, None, None),
        # AoE, official-code weights: softmax over all 6 norms read at the chosen experts;
        # capacity factor 1.0 drops some assignments (their caches get no expert gradient)
        ("aoe_code", fam_cfg(router="aoe", E=6, k=2, d=16, d_ff=20, aoe_rank=5, renormalize=0,
                             capacity_factor=1.0, balance="mixtral", balance_coef=0.05,
                             z_coef=0.01, aoe_scale=1.5),
         40, 302, None, lambda c, r, T: r["dropped"] > 0),
        # GW-MoE paper broadcast: Switch top-1 (no renorm), normalised entropy, ~30% of tokens
        # uncertain, Switch balance, z-loss
        ("gw_paper", fam_cfg(E=8, k=1, renormalize=0, gw_active=1, gw_normalized=1,
                             tau_quantile=0.7, balance="switch", balance_coef=0.05, z_coef=0.01,
                             router_scale=0.35),
         48, 303, None, gw_check(0.2, 0.4)),
        # GW-MoE with a slot cap: renormalised top-2, raw entropy, 4 sequences of 12 tokens,
        # at most 2 broadcast tokens per sequence; capacity factor 1.0 with a skewed router
        # (drops; broadcast tokens take no capacity), Mixtral balance
        ("gw_slots", fam_cfg(E=6, k=2, renormalize=1, gw_active=1, gw_normalized=0,
                             tau_quantile=0.65, gw_slots=2, seq_len=12, capacity_factor=1.0,
                             router_bias=1, balance="mixtral", balance_coef=0.05, z_coef=0.01,
                             router_scale=0.35),
         48, 304, np.array([0.8, 0.3, 0.0, 0.0, -0.3, 0.0]), gw_check(0.15, 0.3, True, True)),
        # GW-MoE released-code emulation: uncertain tokens output p_{E-1} x, top-1 zeroed
        ("gw_released", fam_cfg(E=8, k=1, renormalize=0, gw_active=1, gw_normalized=0,
                                gw_released=1, tau_quantile=0.7, balance="switch",
                                balance_coef=0.05, router_scale=0.35),
         48, 305, None, gw_check(0.2, 0.4)),
        # HyperMoE with Switch top-1 weights (no renorm), layer row 1 of 2, Switch balance
        ("hyper_switch", fam_cfg(E=8, k=1, renormalize=0, hyper=1, balance="switch",
                                 balance_coef=0.05, z_coef=0.01),
         40, 306, None, hyper_check),
        # HyperMoE with renormalised top-2, Mixtral balance
        ("hyper_top2", fam_cfg(E=6, k=2, renormalize=1, hyper=1, hyper_embed=6, hyper_hidden=7,
                               hyper_cond=5, hyper_layer_dim=4, hyper_width=5, hyper_adapter=4,
                               hyper_layers=3, hyper_layer=1, balance="mixtral",
                               balance_coef=0.05),
         40, 307, None, hyper_check),
        # the same with the official code's head biases: W_dn, b_dn, W_up, b_up each plus a
        # learned constant
        ("hyper_bias", fam_cfg(E=6, k=2, renormalize=1, hyper=1, hyper_embed=6, hyper_hidden=7,
                               hyper_cond=5, hyper_layer_dim=4, hyper_width=5, hyper_adapter=4,
                               hyper_layers=3, hyper_layer=1, hyper_head_bias=1, balance="mixtral",
                               balance_coef=0.05),
         40, 307, None, hyper_check),
    ]


# ------------------------------------------------------------------------------------------
# the tiny model with RMoE's recurrent router (and the ablations)
# ------------------------------------------------------------------------------------------

STEPS = 5
MARGIN = 1e-3
ADAM = mr.ADAM


def rmoe_cfg(**over):
    c = dict(vocab=32, d=16, n_layers=3, n_heads=2, d_ff=16, pos="learned", rope_theta=10000.0,
             norm_eps=1e-5, moe_every=1, dense_first=0, B=2, T=12, router_input="gru",
             router_dim=8, steps=0)
    moe = fam_cfg(d=16, d_ff=8, E=4, k=2, renormalize=1, balance="mixtral", balance_coef=0.05,
                  z_coef=0.01)
    c.update(over)
    c["moe"] = moe
    c["max_seq"] = c["T"]
    return c


def model_shapes(c):
    """(name, shape, decay) in moe_model_init's order"""
    d, V, F_, p = c["d"], c["vocab"], c["d_ff"], c["router_dim"]
    out = [("wte", (V, d), 1), ("wpe", (c["max_seq"], d), 1)]
    if c["router_input"].startswith("gru"):
        out += [("rmoe.gru.w_ih", (3 * p, p), 1), ("rmoe.gru.w_hh", (3 * p, p), 1),
                ("rmoe.gru.b_ih", (3 * p,), 0), ("rmoe.gru.b_hh", (3 * p,), 0)]
    for l in range(c["n_layers"]):
        pre = "l%d." % l
        out += [(pre + "ln1.w", (d,), 0), (pre + "attn.wqkv", (3 * d, d), 1),
                (pre + "attn.wo", (d, d), 1), (pre + "ln2.w", (d,), 0)]
        if mr.is_moe(c, l):
            out.append((pre + "rmoe.proj", (p, d), 1))
            for n, shape in param_shapes(c["moe"], pre + "moe.", router_dim=p):
                out.append((n, shape, int(len(shape) >= 2)))
        else:
            out += [(pre + "ffn.w_gate", (1, F_, d), 1), (pre + "ffn.w_up", (1, F_, d), 1),
                    (pre + "ffn.w_down", (1, d, F_), 1)]
    out.append(("lnf.w", (d,), 0))
    return out


def model_init(c, rng, seed):
    """numpy weights by name; the GRU's are torch.nn.GRUCell's own initialisation"""
    d, p = c["d"], c["router_dim"]
    P = {}
    for name, shape, _ in model_shapes(c):
        if name.startswith("rmoe.gru."):
            continue
        if name.endswith(".w") and len(shape) == 1:
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "wte":
            v = 0.25 * rng.standard_normal(shape)
        elif name == "wpe":
            v = 0.2 * rng.standard_normal(shape)
        elif name.endswith("attn.wqkv"):
            v = rng.standard_normal(shape) / math.sqrt(d)
        elif name.endswith("attn.wo"):
            v = 0.5 * rng.standard_normal(shape) / math.sqrt(d)
        elif name.endswith("rmoe.proj"):
            v = rng.standard_normal(shape) / math.sqrt(d)
        elif name.endswith("router.w"):
            v = 4.0 * rng.standard_normal(shape) / math.sqrt(p)
        else:
            bound = 1.0 / math.sqrt(shape[-1])
            v = rng.uniform(-bound, bound, shape)
        P[name] = np.asarray(v, dtype=np.float32)
    cell = None
    if c["router_input"].startswith("gru"):
        torch.manual_seed(seed)
        cell = torch.nn.GRUCell(p, p)  # U(-1/sqrt(p), 1/sqrt(p)) for every weight and bias
        P["rmoe.gru.w_ih"] = cell.weight_ih.detach().numpy().copy()
        P["rmoe.gru.w_hh"] = cell.weight_hh.detach().numpy().copy()
        P["rmoe.gru.b_ih"] = cell.bias_ih.detach().numpy().copy()
        P["rmoe.gru.b_hh"] = cell.bias_hh.detach().numpy().copy()
    return P, cell


def model_forward(c, P, cell, inputs, targets):
    B, T = inputs.shape
    N, d, eps, rin = B * T, c["d"], c["norm_eps"], c["router_input"]
    x = P["wte"][inputs] + P["wpe"][:T]
    aux = torch.zeros(())
    state = torch.zeros(N, c["router_dim"])  # h_0 = 0; dense layers pass it on
    per = {}
    for l in range(c["n_layers"]):
        pre = "l%d." % l
        x = x + mr.attention(mr.rmsnorm(x, P[pre + "ln1.w"], eps), P[pre + "attn.wqkv"],
                             P[pre + "attn.wo"], c)
        h = mr.rmsnorm(x, P[pre + "ln2.w"], eps)
        if mr.is_moe(c, l):
            hN = h.reshape(N, d)
            xp = F.linear(hN, P[pre + "rmoe.proj"])
            if rin == "mlp":
                rh = F.gelu(xp)
            else:
                prev = torch.zeros_like(state) if rin == "gru_np" else state
                if rin == "gru_detach":
                    prev = prev.detach()
                rh = cell(xp, prev)
                state = rh
            r = layer_ref(c["moe"], P, hN, prefix=pre + "moe.", rin=rh)
            r["router_in"] = rh
            per[l] = r
            aux = aux + r["aux_total"]
            ffn = r["y"].reshape(B, T, d)
        else:
            wg, wu, wd = (P[pre + "ffn." + n][0] for n in ("w_gate", "w_up", "w_down"))
            ffn = F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)
        x = x + ffn
    if c.get("balance_all_layers") and per and c["moe"]["balance"] != "none":
        mc = c["moe"]  # one loss over all layers' tokens instead of the layers' own
        f = torch.stack([r["balance_f"] for r in per.values()]).mean(0)
        Pm = torch.stack([r["mean_prob"] for r in per.values()]).mean(0)
        aux = aux - sum(r["aux_balance"] for r in per.values()) + mc["balance_coef"] * mc["E"] * (f * Pm).sum()
    logits = F.linear(mr.rmsnorm(x, P["lnf.w"], eps), P["wte"])
    ce = F.cross_entropy(logits.reshape(N, -1), targets.reshape(-1), ignore_index=-1)
    return logits, ce, aux, per


def model_gap(c, per):
    k = c["moe"]["k"]
    return min(float(routing_gap(r["logits"].detach().double().numpy(), k).min())
               for r in per.values())


def run_model(c, seed):
    rng = np.random.default_rng(seed)
    B, T, V = c["B"], c["T"], c["vocab"]
    P_np, cell = model_init(c, rng, seed)
    inputs = rng.integers(0, V, (B, T))
    targets = np.concatenate([inputs[:, 1:], rng.integers(0, V, (B, 1))], 1)
    targets[B - 1, T // 2] = -1
    inp_t = torch.tensor(inputs, dtype=torch.long)
    tgt_t = torch.tensor(targets, dtype=torch.long)
    shapes = model_shapes(c)
    names = [n for n, _, _ in shapes]
    decay = {n: f for n, _, f in shapes}
    P = {}
    for n in names:
        if n.startswith("rmoe.gru."):
            P[n] = {"w_ih": cell.weight_ih, "w_hh": cell.weight_hh, "b_ih": cell.bias_ih,
                    "b_hh": cell.bias_hh}[n[len("rmoe.gru."):]]
        else:
            P[n] = mg.t32(P_np[n]).requires_grad_()
    logits, ce, aux, per = model_forward(c, P, cell, inp_t, tgt_t)
    if model_gap(c, per) < MARGIN:
        return None
    grads = torch.autograd.grad(ce + aux, [P[n] for n in names], allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(P[n]) for g, n in zip(grads, names)]
    first = dict(logits=logits.detach(), ce=ce.detach(), aux=aux.detach(), per=per,
                 grads=dict(zip(names, grads)))
    traj = dict(loss=[], ce=[], aux=[], topk={l: [] for l in per})
    if c["steps"] > 0:
        opt = torch.optim.AdamW(
            [dict(params=[P[n] for n in names if decay[n]], weight_decay=ADAM["weight_decay"]),
             dict(params=[P[n] for n in names if not decay[n]], weight_decay=0.0)],
            lr=ADAM["lr"], betas=ADAM["betas"], eps=ADAM["eps"])
        for step in range(c["steps"] + 1):
            opt.zero_grad(set_to_none=False)
            _, ce_s, aux_s, ps = model_forward(c, P, cell, inp_t, tgt_t)
            if model_gap(c, ps) < MARGIN:
                return None
            traj["loss"].append(float(ce_s + aux_s))
            traj["ce"].append(float(ce_s))
            traj["aux"].append(float(aux_s))
            for l, r in ps.items():
                traj["topk"][l].append(r["topk"])
            if step == c["steps"]:
                break
            (ce_s + aux_s).backward()
            opt.step()
    final = {n: P[n].detach().clone() for n in names}
    return dict(P_np=P_np, inputs=inputs, targets=targets, names=names, first=first,
                traj=traj, final=final)


def make_model(path, name, c, seed):
    for attempt in range(200):
        r = run_model(c, seed + 1000 * attempt)
        if r is not None:
            break
    else:
        raise RuntimeError("%s: no seed with clear routing margins" % name)
    mc = c["moe"]
    g = GoldenWriter(mg.NOTE)
    g.add("case", np.array([ord(ch) for ch in name], dtype=np.int32), "i32")
    ints = dict(vocab=c["vocab"], max_seq=c["max_seq"], d=c["d"], n_layers=c["n_layers"],
                n_heads=c["n_heads"], d_ff=c["d_ff"], moe_every=c["moe_every"],
                dense_first=c["dense_first"], B=c["B"], T=c["T"], steps=c["steps"],
                router_input=RIN[c["router_input"]], router_dim=c["router_dim"],
                seed=seed + 1000 * attempt)
    moe_ints = dict(d_ff=mc["d_ff"], n_experts=mc["E"], top_k=mc["k"],
                    renormalize=mc["renormalize"], balance=mg.BALANCE[mc["balance"]])
    floats = dict(norm_eps=c["norm_eps"], lr=ADAM["lr"], beta1=ADAM["betas"][0],
                  beta2=ADAM["betas"][1], eps=ADAM["eps"], weight_decay=ADAM["weight_decay"])
    moe_floats = dict(balance_coef=mc["balance_coef"], z_coef=mc["z_coef"])
    if c.get("balance_all_layers"):  # recorded only where set: older files stay as they were
        ints["balance_all_layers"] = 1
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
    for l, mo in first["per"].items():
        g.add("l%d.router_in" % l, mo["router_in"])
        g.add("l%d.router_logits" % l, mo["logits"])
        g.add("l%d.topk" % l, np.array(mo["topk"], dtype=np.int32), "i32")
        g.add("l%d.aux" % l, mo["aux_total"])
    for n in r["names"]:
        g.add("grad." + n, first["grads"][n])
    if c["steps"] > 0:
        tr = r["traj"]
        g.add("traj.loss", np.array(tr["loss"], dtype=np.float32))
        g.add("traj.ce", np.array(tr["ce"], dtype=np.float32))
        g.add("traj.aux", np.array(tr["aux"], dtype=np.float32))
        for l, ids in tr["topk"].items():
            g.add("traj.l%d.topk" % l, np.array(ids, dtype=np.int32), "i32")
        for n in r["names"]:
            g.add("final." + n, r["final"][n])
    size = g.save(path)
    return size, r, ints["seed"]


def model_cases():
    return [
        # RMoE: 3 MoE layers, one GRU (p = 8) carrying h through depth, 5 AdamW steps
        ("gru", rmoe_cfg(router_input="gru", steps=STEPS), 401),
        # MoE / dense / MoE / dense: the dense layers pass h on (layer 2 reads layer 0's h)
        ("gru_dense", rmoe_cfg(router_input="gru", n_layers=4, moe_every=2), 402),
        # ablation NP: every layer's GRU step starts from h = 0
        ("gru_np", rmoe_cfg(router_input="gru_np"), 403),
        # ablation detach: h_{l-1} enters layer l without a gradient back
        ("gru_detach", rmoe_cfg(router_input="gru_detach"), 404),
        # SMoE-MLP baseline: router on GELU(x P^T)
        ("mlp", rmoe_cfg(router_input="mlp"), 405),
        # RMoE with its code's balance loss: one over all 3 layers' tokens, 5 AdamW steps
        ("gru_balance_all", rmoe_cfg(router_input="gru", steps=STEPS, balance_all_layers=1), 406),
    ]


def main(only=()):
    total = 0
    for name, c, T, seed, skew, check in layer_cases():
        if only and "family_" + name not in only:
            continue
        path = os.path.join(OUT_DIR, "family_%s.bin" % name)
        size, r = make_layer(path, name, c, T, seed, skew, check)
        total += size
        extra = ""
        if c["gw_threshold"] > 0:
            extra = ", tau %.4g: %d broadcast" % (c["gw_threshold"], r["broadcast"])
        if c["hyper"]:
            extra = ", |hyper| / |experts| = %.3g" % (
                r["hyper_out"].norm().item() / (r["y"] - r["hyper_out"]).norm().item())
        print("family_%s.bin: %d bytes, T=%d E=%d k=%d, kept %d dropped %d, aux %.6g%s"
              % (name, size, T, c["E"], c["k"], r["kept"], r["dropped"], float(r["aux_total"]),
                 extra))
    for name, c, seed in model_cases():
        if only and "rmoe_" + name not in only:
            continue
        size, r, used = make_model(os.path.join(OUT_DIR, "rmoe_%s.bin" % name), name, c, seed)
        total += size
        tr = r["traj"]
        msg = "loss %.6g -> %.6g" % (tr["loss"][0], tr["loss"][-1]) if tr["loss"] else \
            "ce %.6g aux %.6g" % (float(r["first"]["ce"]), float(r["first"]["aux"]))
        print("rmoe_%s.bin: %d bytes, seed %d, %d params, %s"
              % (name, size, used, sum(v.size for v in r["P_np"].values()), msg))
    return total


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("total %d bytes" % main(sys.argv[1:]))
