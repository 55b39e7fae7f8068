#!/usr/bin/python3
"""Reference values for reward.h's multi-objective and semi-supervised parts
(tests/test_reward_multiobj.c), written as tests/ref/multiobj_ref.txt beside this script: one
array per line, "name count v0 v1 ..." (float64 repr; integers as floats).

Run with Debian's /usr/bin/python3 (python3-numpy, python3-scipy, python3-torch), or `make goldens`:

    /usr/bin/python3 tests/ref/multiobj_ref.py

Written from the papers' math and the official code's documented behaviour, not from reward.h:
  ridge_*      ridge without intercept (ArmoRM stage 1, arXiv 2406.12845): numpy's solve of the
               normal equations (X^T X + lambda I) w = X^T t over the rows with a target; an
               underdetermined case (6 rows, 20 features) checked against the dual form too
  regress_*    the lambda grid 1e-4..1e4 chosen per objective by validation MSE on a given split
               (the first lambda on ties, pandas' idxmin), the fit on the training rows only
  verb_*       the verbosity penalty search of ArmoRM's stage-2 script with scipy's spearmanr
  gate_*       the gating network (Linear-ReLU x2, Linear, softmax(z / tau) * logit_scale) in
               PyTorch float64: gates, the Bradley-Terry loss of the mixed rewards, every gradient
  hv*_ / pf*_  hypervolumes by an independent method (coordinate compression: the union of the
               boxes [ref, p] measured cell by cell) and Pareto fronts by brute force
  dpa_*        DPA's prompt weights, np.round(100 cos t), np.round(100 sin t) (arXiv 2402.18571)
"""
import os

import numpy as np
import scipy.stats
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = []


def put(name, a):
    a = np.asarray(a, dtype=np.float64).ravel()
    OUT.append("%s %d %s" % (name, a.size, " ".join(repr(float(v)) for v in a)))


def f32(a):
    """values that float32 holds exactly, so C (float features) and numpy see the same inputs"""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def ridge(X, t, lam):
    m = np.isfinite(t)
    X, t = X[m], t[m]
    return np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ t)


def ridge_cases(rng):
    X = f32(rng.normal(size=(30, 6)))
    t = X @ np.array([1.0, -2.0, 0.5, 0.0, 3.0, -1.0]) + 0.3 * rng.normal(size=30)
    t[[3, 11, 27]] = np.nan
    put("ridge_p_x", X)
    put("ridge_p_t", t)
    put("ridge_p_lambda", [0.3])
    put("ridge_p_w", ridge(X, t, 0.3))
    # fewer rows than features: 8 rows, 2 without a target, 20 features
    X = f32(rng.normal(size=(8, 20)))
    t = rng.normal(size=8)
    t[[1, 5]] = np.nan
    w = ridge(X, t, 0.05)
    m = np.isfinite(t)
    wd = X[m].T @ np.linalg.solve(X[m] @ X[m].T + 0.05 * np.eye(m.sum()), t[m])
    assert np.allclose(w, wd, rtol=1e-8, atol=1e-10)
    put("ridge_d_x", X)
    put("ridge_d_t", t)
    put("ridge_d_lambda", [0.05])
    put("ridge_d_w", w)


def regress_case(rng):
    n, d, K = 80, 5, 3
    X = f32(rng.normal(size=(n, d)))
    Y = np.empty((n, K))
    Y[:, 0] = X @ np.array([0.5, -1.0, 2.0, 0.0, 1.0]) + 0.01 * rng.normal(size=n)  # clean: small lambda
    Y[:, 1] = X @ np.array([0.3, 0.2, -0.1, 0.4, 0.0]) + 1.0 * rng.normal(size=n)   # noisy: middle
    Y[:, 2] = 5.0 * rng.normal(size=n)                                              # noise: the largest
    Y[rng.random(size=(n, K)) < 0.25] = np.nan  # missing ratings
    val = np.zeros(n)
    val[rng.permutation(n)[:16]] = 1
    lambdas = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]
    W, best, mses = [], [], []
    for k in range(K):
        tr = (val == 0) & np.isfinite(Y[:, k])
        va = (val == 1) & np.isfinite(Y[:, k])
        row = []
        for lam in lambdas:
            w = ridge(X[tr], Y[tr, k], lam)
            row.append(np.mean((X[va] @ w - Y[va, k]) ** 2))
        q = int(np.argmin(row))  # the first minimum, as pandas' idxmin
        best.append(lambdas[q])
        mses.extend(row)
        W.append(ridge(X[tr], Y[tr, k], lambdas[q]))
    put("regress_x", X)
    put("regress_y", Y)
    put("regress_val", val)
    put("regress_lambda", best)
    put("regress_mse", mses)
    put("regress_w", np.array(W))


def verbosity_case(rng):
    """find_proper_verbosity_penalties of the stage-2 script, threshold 0.03"""
    M, K, v = 300, 5, 1
    V = np.empty((M, K))
    V[:, v] = rng.normal(size=M)
    V[:, 0] = 0.5 * V[:, v] + rng.normal(size=M)          # closes at a middle penalty
    V[:, 2] = -V[:, v] + 0.5 * rng.normal(size=M)         # already negative: closes at 0
    V[:, 3] = 3.0 * V[:, v] + 0.1 * rng.normal(size=M)    # never closes: stays at 1
    V[:, 4] = 0.2 * V[:, v] + rng.normal(size=M)
    grid = [0, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55,
            0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    cand = set(range(K)) - {v}
    pen, corr = np.ones(K), np.ones(K)
    for p in grid:
        if not cand:
            break
        adj = V - p * V[:, [v]]
        for j in sorted(cand):
            c = scipy.stats.spearmanr(adj[:, j], V[:, v])[0]
            assert abs(c - 0.03) > 1e-9, "a correlation too close to the threshold"
            if c <= 0.03:
                cand.remove(j)
                pen[j], corr[j] = p, c
            else:
                corr[j] = min(corr[j], c)
    assert pen[3] == 1.0 and pen[2] == 0.0 and 0 < pen[0] < 1
    put("verb_V", V)
    put("verb_penalty", pen)
    put("verb_corr", corr)


def gate_case(rng, tag, n_hidden, tau, scale):
    torch.set_default_dtype(torch.float64)
    B, d, H, K = 6, 7, 9, 4
    x = torch.tensor(f32(rng.normal(size=(B, d))), requires_grad=True)
    dims = [d] + [H] * n_hidden + [K]
    P = []
    for l in range(n_hidden + 1):
        bound = 1.0 / np.sqrt(dims[l])
        P.append(torch.tensor(f32(3.0 * rng.uniform(-bound, bound, (dims[l + 1], dims[l]))), requires_grad=True))
        P.append(torch.tensor(f32(rng.uniform(-bound, bound, dims[l + 1])), requires_grad=True))
    beta = torch.tensor(f32([scale]), requires_grad=True)
    rw, rl = rng.normal(size=(B, K)), rng.normal(size=(B, K))
    h = x
    for l in range(n_hidden):
        h = torch.relu(h @ P[2 * l].T + P[2 * l + 1])
    z = h @ P[2 * n_hidden].T + P[2 * n_hidden + 1]
    g = torch.softmax(z / tau, dim=1) * beta[0]  # over the objectives (the paper), not over the pair
    m = (g * torch.tensor(rw - rl)).sum(1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(m, torch.ones(B))
    loss.backward()
    put(tag + "_x", x.detach().numpy())
    put(tag + "_rw", rw)
    put(tag + "_rl", rl)
    names = ["l%d" % l for l in range(n_hidden)] + ["out"]
    for l, nm in enumerate(names):
        put("%s_%s.w" % (tag, nm), P[2 * l].detach().numpy())
        put("%s_%s.b" % (tag, nm), P[2 * l + 1].detach().numpy())
        put("%s_g%s.w" % (tag, nm), P[2 * l].grad.numpy())
        put("%s_g%s.b" % (tag, nm), P[2 * l + 1].grad.numpy())
    put(tag + "_scale", beta.detach().numpy())
    put(tag + "_gscale", beta.grad.numpy())
    put(tag + "_gates", g.detach().numpy())
    put(tag + "_loss", [loss.item()])
    put(tag + "_dx", x.grad.numpy())


def hv_grid(P, ref):
    """volume of the union of boxes [ref, p] by coordinate compression (independent of slicing)"""
    P = np.array([p for p in P if np.all(p > ref)])
    if len(P) == 0:
        return 0.0
    k = P.shape[1]
    axes = [np.unique(np.concatenate([[ref[c]], P[:, c]])) for c in range(k)]
    total = 0.0
    for cell in np.ndindex(*[len(a) - 1 for a in axes]):
        lo = np.array([axes[c][cell[c]] for c in range(k)])
        hi = np.array([axes[c][cell[c] + 1] for c in range(k)])
        if np.any(np.all(P >= hi, axis=1)):
            total += np.prod(hi - lo)
    return total


def pareto_brute(P):
    keep = []
    for i, p in enumerate(P):
        dom = any(np.all(q >= p) and np.any(q > p) for j, q in enumerate(P) if j != i)
        if not dom:
            keep.append(i)
    return keep


def front_cases(rng):
    for k, n in ((2, 30), (3, 22), (4, 12)):
        P = np.round(rng.normal(size=(n, k)), 2)  # rounded: ties and duplicates happen
        P[5] = P[3]                               # an exact duplicate
        P[7] = P[3] - 0.5                         # dominated by it
        ref = np.full(k, -1.5)
        put("pf%d_points" % k, P)
        put("pf%d_front" % k, pareto_brute(P))
        put("hv%d_ref" % k, ref)
        put("hv%d_value" % k, [hv_grid(P, ref)])


def dpa_cases():
    deg = np.array([-45, -30, -15, 0, 10, 15, 30, 45, 60, 75, 90], dtype=np.float64)
    rad = np.radians(deg)
    put("dpa_theta", rad)
    put("dpa_wh", np.round(np.cos(rad) * 100).astype(int))
    put("dpa_wb", np.round(np.sin(rad) * 100).astype(int))
    halves = np.array([0.125, -0.125, 0.135, 0.005, 0.015, 0.285, -0.745])
    put("dpa_half_v", halves)
    put("dpa_half_w", np.round(halves * 100).astype(int))


def main():
    rng = np.random.default_rng(2406)
    ridge_cases(rng)
    regress_case(rng)
    verbosity_case(rng)
    gate_case(rng, "gate2", 2, 10.0, 1.0)
    gate_case(rng, "gate0", 0, 1.5, 1.3)
    front_cases(rng)
    dpa_cases()
    path = os.path.join(HERE, "multiobj_ref.txt")
    with open(path, "w") as f:
        f.write("\n".join(OUT) + "\n")
    print("multiobj_ref.txt: %d arrays" % len(OUT))


if __name__ == "__main__":
    main()
