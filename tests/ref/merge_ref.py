#!/usr/bin/python3
"""merge_ref.py - numpy reference of reward.h's merging and averaging (tests/test_reward_merge.c).

Run with Debian's interpreter (python3-numpy); `make goldens` runs it through make_goldens.py:

    /usr/bin/python3 tests/ref/merge_ref.py

Writes tests/ref/merge.bin (format: golden.py): a small tensor table named like moe.h's model
("wte", "l0.attn.wqkv", ..., "lnf.w"), a base model and three models in its flat layout, and
for every case its parameters and the merged flat buffer.

The formulas are transcribed from mergekit's documented behaviour (github.com/arcee-ai/mergekit,
merge_methods/linear.py, slerp.py, generalized_task_arithmetic.py, sparsify.py), not from
reward.h's C code:
  linear       sum_m w_m x_m, / sum_m w_m with normalize
  slerp        unit directions (a norm <= 1e-8 left undivided), dot d; |d| > 0.9995: lerp;
               else sin((1-t)O)/sin O x_0 + sin(tO)/sin O x_1 on the unnormalised tensors
  task vectors tau_m = x_m - base (float32), sparsified: magnitude = top int(density n) by |tau|
               (stable order, ties to the lower index), random = a Bernoulli(density) mask,
               magnitude_outliers = drop int(gamma n) largest, then the smallest;
               rescaled by 1/density or to the unmasked L1/L2/Linf norm (eps 1e-7);
               u_m = w_m tau_m'; sign election by sum or by count of signs, disjoint mean with
               a divisor of 0 read as 1; normalize divides by the (masked) sum of weights
  Two deliberate differences from mergekit, the same as reward.h's (see its merge section):
  magnitude keeps at least one entry (mergekit asserts), and magnitude_outliers with
  int(gamma n) = 0 drops no large entry (mergekit's slice [n_bot:-0] keeps nothing).
DARE's draws: numpy's generator cannot be reproduced in C, so the masks are drawn here and
stored; the C test passes them through rwd_merge_config.keep_masks (a documented hook) and tests
its own Bernoulli draws separately (kept share, seeding, expectation).

Averaging against the alignment tax (arXiv 2309.06256): theta = (1-l) pre + l post; part-wise
with pivots (layer l in block = number of pivots below l); HMA's ratios
lambda_k = 1 - (1-mean) K (sigmoid(a_k)+eps) / sum_j (sigmoid(a_j)+eps), its merge with the
linear maps of the layers following their block and norms, embeddings and everything outside
the layers from pre (official), or every layer tensor following and the rest at the mean.
"""
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from golden import GoldenWriter  # noqa: E402

OUT_DIR = os.path.dirname(os.path.abspath(__file__))

LAYOUT = [
    ("wte", (12, 8)),
    ("l0.ln1.w", (8,)),
    ("l0.attn.wqkv", (24, 8)),
    ("l0.attn.wo", (8, 8)),
    ("l1.ln1.w", (8,)),
    ("l1.attn.wqkv", (24, 8)),
    ("l1.ffn.w_up", (1, 6, 8)),
    ("l2.attn.wo", (8, 8)),
    ("l2.moe.router.w", (4, 8)),
    ("lnf.w", (8,)),
]

# enums of reward.h
KIND = {"merge": 0, "average": 1, "partwise": 2, "hma": 3}
METHOD = {"linear": 0, "slerp": 1, "task_arithmetic": 2, "ties": 3, "dare_linear": 4,
          "dare_ties": 5, "breadcrumbs": 6, "breadcrumbs_ties": 7}
SPARSIFY = {"none": 0, "magnitude": 1, "random": 2, "outliers": 3}
CONSENSUS = {"none": 0, "sum": 1, "count": 2}
RESCALE = {"none": 0, "density": 1, "l1": 2, "l2": 3, "linf": 4}
PER = {"model": 0, "tensor": 1, "block": 2}
FOLLOW = {"linear": 0, "all": 1}


def offsets():
    out, off = [], 0
    for name, shape in LAYOUT:
        n = int(np.prod(shape))
        out.append((name, off, n))
        off += n
    return out, off


def layer_of(name):
    if len(name) > 1 and name[0] == "l" and name[1].isdigit():
        head = name.split(".")[0]
        if head[1:].isdigit():
            return int(head[1:])
    return -1


def is_norm_or_embedding(name):
    for part in name.split("."):
        if part.startswith("ln") or "norm" in part or "emb" in part or part in ("wte", "wpe"):
            return True
    return False


def block_map(pivots):
    return [(-1 if layer_of(n) < 0 else sum(1 for p in pivots if layer_of(n) > p)) for n, _ in LAYOUT]


def f32(x):
    return np.asarray(x, dtype=np.float32)


# ---- per-tensor methods (float64 arithmetic on float32 inputs, as reward.h accumulates) ----

def linear(xs, w, normalize):
    acc = np.zeros(xs[0].shape)
    for x, wm in zip(xs, w):
        acc = acc + wm * x.astype(np.float64)
    return acc / sum(w) if normalize else acc


def slerp(v0, v1, t, dot_threshold=0.9995, eps=1e-8):
    a, b = v0.astype(np.float64), v1.astype(np.float64)
    na, nb = math.sqrt(float(np.dot(a, a))), math.sqrt(float(np.dot(b, b)))
    d = float(np.dot(a / (na if na > eps else 1.0), b / (nb if nb > eps else 1.0)))
    if abs(d) > dot_threshold:
        return (1 - t) * a + t * b, True
    om = math.acos(d)
    return math.sin((1 - t) * om) / math.sin(om) * a + math.sin(t * om) / math.sin(om) * b, False


def norm_of(x, kind):
    if kind == "l1":
        return float(np.sum(np.abs(x)))
    if kind == "l2":
        return math.sqrt(float(np.sum(x * x)))
    return float(np.max(np.abs(x)))


def sparsify(tau, method, density, gamma, mask, rescale):
    """tau float32 (n); returns float32"""
    if method == "none" or density >= 1:
        return tau
    n = tau.size
    mag = np.abs(tau.astype(np.float64))
    keep = np.zeros(n, dtype=bool)
    if method == "random":
        keep = mask.astype(bool)
    elif method == "magnitude":
        k = max(int(density * n), 1)  # mergekit asserts k > 0; reward.h keeps one entry
        keep[np.argsort(-mag, kind="stable")[:k]] = True
    elif method == "outliers":
        target, n_top = int(density * n), int(gamma * n)
        n_bot = n - target - n_top
        if n_bot < 0:
            n_top += n_bot
            n_bot = 0
        order = np.argsort(mag, kind="stable")
        keep[order[n_bot:n - n_top]] = True  # mergekit: order[n_bot:-n_top], empty when n_top == 0
    masked = np.where(keep, tau, np.float32(0)).astype(np.float32)
    if rescale == "none":
        return masked
    if rescale == "density":
        return (masked.astype(np.float64) / density).astype(np.float32)
    else:
        before = norm_of(tau.astype(np.float64), rescale)
        after = norm_of(masked.astype(np.float64), rescale)
        scale = 1.0 if (before < 1e-7 or after < 1e-7) else before / after
    return (masked.astype(np.float64) * scale).astype(np.float32)


def task_vectors(base, xs, w, sp, consensus, normalize, rescale, densities, gamma, masks, margin):
    taus = []
    for m, x in enumerate(xs):
        tau = (x - base).astype(np.float32)
        taus.append(sparsify(tau, sp, densities[m], gamma, None if masks is None else masks[m], rescale))
    n = base.size
    out = np.zeros(n)
    for i in range(n):
        u = [w[m] * float(taus[m][i]) for m in range(len(xs))]
        if consensus == "none":
            delta, div = 0.0, 0.0
            for m in range(len(xs)):
                delta += u[m]
                div += w[m]
        else:
            vote = 0.0
            for m in range(len(xs)):
                vote += u[m] if consensus == "sum" else float(np.sign(u[m]))
            if consensus == "sum" and vote != 0.0:
                margin.append(abs(vote))
            s = 1.0 if vote >= 0 else -1.0
            delta, div = 0.0, 0.0
            for m in range(len(xs)):
                if np.sign(u[m]) == s:
                    delta += u[m]
                    div += w[m]
            if div == 0.0:
                div = 1.0
        out[i] = float(base[i]) + (delta / div if normalize else delta)
    return out


def hma_lambdas(a, mean, eps):
    sig = 1.0 / (1.0 + np.exp(-np.asarray(a, dtype=np.float64)))
    u = sig + eps
    return 1.0 - (1.0 - mean) * len(a) * u / np.sum(u)


# ---- cases ----

def merge_case(name, method, w, per="model", normalize=None, sparsify_="none", consensus="none",
               rescale="none", density=1.0, densities=None, gamma=0.01, masks=False, pivots=(0, 1)):
    return dict(kind="merge", name=name, method=method, w=w, per=per, normalize=normalize,
                sparsify=sparsify_, consensus=consensus, rescale=rescale, density=density,
                densities=densities, gamma=gamma, masks=masks, pivots=list(pivots))


def cases():
    wm = [0.6, 0.3, -0.2]
    wb = [[0.5, 0.2, 0.3], [0.1, 0.8, 0.4], [0.3, 0.3, -0.3], [0.7, 0.2, 0.1]]  # 3 blocks + outside
    wt = [[0.2 + 0.05 * t, 0.5 - 0.03 * t, 0.1 * ((t % 3) - 1)] for t in range(len(LAYOUT))]
    return [
        merge_case("linear", "linear", wm, normalize=1),
        merge_case("linear_raw_block", "linear", wb, per="block", normalize=0),
        merge_case("linear_tensor", "linear", wt, per="tensor", normalize=1),
        merge_case("slerp", "slerp", [0.3]),
        merge_case("slerp_block", "slerp", [[0.2], [0.5], [0.9], [0.4]], per="block"),
        merge_case("task_arithmetic", "task_arithmetic", wm, normalize=0),
        merge_case("task_arithmetic_norm_block", "task_arithmetic", wb, per="block", normalize=1),
        merge_case("ties", "ties", wm, normalize=1, sparsify_="magnitude", consensus="sum",
                   density=0.4),
        merge_case("ties_count", "ties", wm, normalize=1, sparsify_="magnitude",
                   consensus="count", density=0.6),
        merge_case("ties_raw_block", "ties", wb, per="block", normalize=0,
                   sparsify_="magnitude", consensus="sum", density=0.3),
        merge_case("ties_densities_l2", "ties", wm, normalize=1, sparsify_="magnitude",
                   consensus="sum", rescale="l2", densities=[0.2, 0.5, 0.9]),
        merge_case("dare_linear", "dare_linear", wm, normalize=0, sparsify_="random",
                   rescale="density", density=0.5, masks=True),
        merge_case("dare_linear_l1", "dare_linear", wm, normalize=0, sparsify_="random",
                   rescale="l1", density=0.5, masks=True),
        merge_case("dare_ties", "dare_ties", wm, normalize=0, sparsify_="random",
                   consensus="sum", rescale="density", density=0.5, masks=True),
        merge_case("dare_ties_linf_block", "dare_ties", wb, per="block", normalize=1,
                   sparsify_="random", consensus="sum", rescale="linf", density=0.5, masks=True),
        merge_case("breadcrumbs", "breadcrumbs", wm, normalize=0, sparsify_="outliers",
                   density=0.7, gamma=0.05),
        merge_case("breadcrumbs_ties", "breadcrumbs_ties", wm, normalize=0,
                   sparsify_="outliers", consensus="sum", density=0.5, gamma=0.1),
        merge_case("breadcrumbs_crowded", "breadcrumbs", wm, normalize=0,
                   sparsify_="outliers", density=0.9, gamma=0.2),
        dict(kind="average", name="average", lam=0.3),
        dict(kind="partwise", name="partwise", pivots=[0], w=[0.2, 0.7, 0.5]),
        dict(kind="hma", name="hma_linear", pivots=[0, 1], w=[0.3, -1.2, 2.0], mean=0.7,
             eps=0.2, follow="linear"),
        dict(kind="hma", name="hma_all", pivots=[1], w=[-0.5, 1.5], mean=0.4, eps=0.05,
             follow="all"),
    ]


def make_inputs(rng):
    offs, numel = offsets()
    base = f32(rng.standard_normal(numel))
    ms = [f32(base + 0.5 * rng.standard_normal(numel)) for _ in range(3)]
    # SLERP's fallback: model 1 near-parallel to model 0 on one tensor, near-antiparallel on
    # another (|dot| > 0.9995 both)
    for name, off, n in offs:
        if name == "l0.attn.wo":
            ms[1][off:off + n] = f32(1.7 * ms[0][off:off + n] + 1e-3 * rng.standard_normal(n))
        if name == "l2.moe.router.w":
            ms[1][off:off + n] = f32(-0.8 * ms[0][off:off + n] + 1e-3 * rng.standard_normal(n))
    masks = [(rng.random(numel) < 0.5).astype(np.int32) for _ in range(3)]
    return base, ms, masks


def run_case(c, base, ms, masks, pre_post):
    offs, numel = offsets()
    out = np.zeros(numel)
    info = {}
    if c["kind"] == "merge":
        blocks = block_map(c["pivots"])
        nb = max(blocks) + 1
        margin = []
        fallbacks = 0
        for t, (name, off, n) in enumerate(offs):
            if c["per"] == "model":
                w = c["w"]
            elif c["per"] == "tensor":
                w = c["w"][t]
            else:
                w = c["w"][nb if blocks[t] < 0 else blocks[t]]
            w = [float(np.float32(v)) for v in w]  # the golden stores weights as float32
            xs = [m[off:off + n] for m in ms]
            if c["method"] == "linear":
                out[off:off + n] = linear(xs, w, c["normalize"])
            elif c["method"] == "slerp":
                out[off:off + n], fb = slerp(xs[0], xs[1], w[0])
                fallbacks += fb
            else:
                dens = c["densities"] or [c["density"]] * 3
                dens = [float(np.float32(d)) for d in dens]
                mk = [mm[off:off + n] for mm in masks] if c["masks"] else None
                out[off:off + n] = task_vectors(base[off:off + n], xs, w, c["sparsify"],
                                                c["consensus"], c["normalize"], c["rescale"],
                                                dens, float(np.float32(c["gamma"])), mk, margin)
        if margin and min(margin) < 1e-5:
            raise RuntimeError("%s: a sign election is too close to 0 (%g); change the seed"
                               % (c["name"], min(margin)))
        info["fallbacks"] = fallbacks
    else:
        pre, post = pre_post
        lam_t = np.zeros(len(LAYOUT))
        if c["kind"] == "average":
            lam_t[:] = float(np.float32(c["lam"]))
        elif c["kind"] == "partwise":
            blocks = block_map(c["pivots"])
            w = [float(np.float32(v)) for v in c["w"]]
            lam_t = np.array([w[-1] if b < 0 else w[b] for b in blocks])
        else:
            blocks = block_map(c["pivots"])
            a = [float(np.float32(v)) for v in c["w"]]
            mean, eps = float(np.float32(c["mean"])), float(np.float32(c["eps"]))
            lam = hma_lambdas(a, mean, eps)
            info["lambdas"] = lam
            for t, (name, _, _) in enumerate(offs):
                b = blocks[t]
                if c["follow"] == "linear":
                    lam_t[t] = lam[b] if (b >= 0 and not is_norm_or_embedding(name)) else 0.0
                else:
                    lam_t[t] = lam[b] if b >= 0 else mean
        for t, (name, off, n) in enumerate(offs):
            out[off:off + n] = (1.0 - lam_t[t]) * pre[off:off + n].astype(np.float64) \
                + lam_t[t] * post[off:off + n].astype(np.float64)
    return out, info


def main():
    rng = np.random.default_rng(20260118)
    base, ms, masks = make_inputs(rng)
    offs, numel = offsets()
    g = GoldenWriter("generated by numpy %s (merge_ref.py: mergekit's formulas)" % np.__version__)
    g.add("layout.count", np.int32(len(LAYOUT)), "i32")
    for t, (name, shape) in enumerate(LAYOUT):
        g.add("layout.%d.name" % t, np.frombuffer(name.encode("ascii"), dtype=np.uint8), "i32")
        g.add("layout.%d.shape" % t, np.array(shape), "i32")
    g.add("base", base)
    for m in range(3):
        g.add("model%d" % m, ms[m])
        g.add("mask%d" % m, masks[m], "i32")
    cs = cases()
    g.add("cases", np.int32(len(cs)), "i32")
    for i, c in enumerate(cs):
        p = "case%d." % i
        g.add(p + "name", np.frombuffer(c["name"].encode("ascii"), dtype=np.uint8), "i32")
        if c["kind"] == "merge":
            normalize = c["normalize"] if c["normalize"] is not None else 0
            cfg = [KIND["merge"], METHOD[c["method"]], SPARSIFY[c["sparsify"]],
                   CONSENSUS[c["consensus"]], normalize, RESCALE[c["rescale"]], PER[c["per"]],
                   int(c["masks"]), 0]
            dens = c["densities"] or [-1.0, -1.0, -1.0]
            fl = [c["density"], c["gamma"]] + list(dens) + [0.0, 0.0, 0.0]
        else:
            cfg = [KIND[c["kind"]], 0, 0, 0, 0, 0, 0, 0, FOLLOW.get(c.get("follow"), 0)]
            fl = [1.0, 0.0, -1.0, -1.0, -1.0, c.get("lam", 0.0), c.get("mean", 0.0),
                  c.get("eps", 0.0)]
        g.add(p + "cfg", np.array(cfg), "i32")
        g.add(p + "f", np.array(fl), "f32")
        g.add(p + "w", np.array(c.get("w", [0.0])).reshape(-1), "f32")
        g.add(p + "pivots", np.array(c.get("pivots", [-1])), "i32")
        out, info = run_case(c, base, ms, masks, (base, ms[0]))
        g.add(p + "out", out.astype(np.float32))
        if "lambdas" in info:
            g.add(p + "lambdas", info["lambdas"])
        extra = ""
        if c["kind"] == "merge" and c["method"] == "slerp":
            extra = ", %d tensors fell back to linear" % info["fallbacks"]
            if info["fallbacks"] != 2:
                raise RuntimeError("slerp: expected the 2 near-(anti)parallel tensors to fall back")
        print("merge.bin case %-28s |out| %.6g%s" % (c["name"], float(np.linalg.norm(out)), extra))
    size = g.save(os.path.join(OUT_DIR, "merge.bin"))
    print("merge.bin: %d bytes, %d cases" % (size, len(cs)))
    return size


if __name__ == "__main__":
    main()
