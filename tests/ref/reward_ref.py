#!/usr/bin/python3
"""Reference values for reward.h's tests (tests/test_reward_*.c), written as small text files
beside this script. Run with Debian's /usr/bin/python3 (python3-numpy, python3-statsmodels,
python3-torch):  /usr/bin/python3 tests/ref/reward_ref.py

  lowess_ref.csv    statsmodels LOWESS on 400 integer-like lengths with ties (spec 2.4)
  rc_ref.csv        RC-Mean and RC-LWR as the paper's code computes them (spec 2.2, 2.3)
  metrics_ref.csv   two series with ties; metrics_ref.txt: scipy's Pearson, Spearman, Kendall tau-b
  bt_ref.txt        Bradley-Terry / PoE losses and gradients of tiny heads in PyTorch (spec 0.1, 1)
"""
import bisect
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def write_csv(name, header, cols):
    with open(os.path.join(HERE, name), "w") as f:
        f.write(",".join(header) + "\n")
        for row in zip(*cols):
            f.write(",".join(repr(float(v)) for v in row) + "\n")


def lowess_ref():
    from statsmodels.nonparametric.smoothers_lowess import lowess
    rng = np.random.default_rng(5)
    n = 400
    x = np.floor(rng.lognormal(5.0, 0.6, n))  # lengths: many ties
    y = 0.002 * x + np.where(rng.random(n) < 0.3, 1.5, 0.0) + rng.normal(0, 0.3, n)
    settings = [(0.3, 3), (1.0, 3), (0.1, 0), (0.5, 1), (0.05, 3)]
    cols = [x, y] + [lowess(y, x, frac=f, it=it, delta=0.0, return_sorted=False) for f, it in settings]
    write_csv("lowess_ref.csv", ["x", "y"] + ["fit_frac%g_it%d" % s for s in settings], cols)


def rc_ref():
    """The paper's find_interval / np.mean window (calibrate_rewardbench.py) on pairs whose 2N
    lengths are distinct, so its unseeded shuffle cannot change anything; and the paper's
    RC-LWR lookup (bisect_left into the sorted LOWESS output) for out-of-sample queries."""
    from statsmodels.nonparametric.smoothers_lowess import lowess
    rng = np.random.default_rng(7)
    n = 60
    lens = rng.permutation(np.arange(10, 10 + 7 * 2 * n, 7)).astype(float)[: 2 * n]
    lw, ll = lens[:n], lens[n:]
    sw = 0.004 * lw + rng.normal(0, 0.5, n)
    sl = 0.004 * ll + rng.normal(0, 0.5, n)
    ratio, min_count, alpha = 4.0, 5, 1.0
    T = np.mean(np.abs(lw - ll)) / ratio
    pts = sorted([(lw[i], sw[i]) for i in range(n)] + [(ll[i], sl[i]) for i in range(n)], key=lambda p: p[0])
    feats = [p[0] for p in pts]
    scores = [p[1] for p in pts]

    def window(c):
        return scores[bisect.bisect_left(feats, c - T): bisect.bisect_right(feats, c + T) - 1]

    mw, ml = [], []
    for i in range(n):
        b1, b2 = window(lw[i]), window(ll[i])
        if len(b1) >= min_count and len(b2) >= min_count:
            mw.append(sw[i] - alpha * np.mean(b1))
            ml.append(sl[i] - alpha * np.mean(b2))
        else:
            mw.append(sw[i])
            ml.append(sl[i])
    # RC-LWR: fit on the pairs (frac 0.3), predict at shifted queries with the paper's lookup
    xs = list(lw) + list(ll)
    ys = list(sw) + list(sl)
    fit = lowess(ys, xs, frac=0.3)
    q = lw + 3.0
    pred = [fit[min(bisect.bisect_left(fit[:, 0], v), len(fit) - 1), 1] for v in q]
    write_csv("rc_ref.csv", ["len_w", "len_l", "s_w", "s_l", "mean_w", "mean_l", "query", "lwr_pred"],
              [lw, ll, sw, sl, mw, ml, q, pred])


def metrics_ref():
    import scipy.stats
    rng = np.random.default_rng(9)
    n = 300
    a = np.floor(rng.normal(0, 3, n))  # ties
    b = np.round(0.5 * a + rng.normal(0, 2, n), 1)
    write_csv("metrics_ref.csv", ["a", "b"], [a, b])
    with open(os.path.join(HERE, "metrics_ref.txt"), "w") as f:
        f.write("pearson=%r\n" % float(scipy.stats.pearsonr(a, b)[0]))
        f.write("spearman=%r\n" % float(scipy.stats.spearmanr(a, b)[0]))
        f.write("kendall=%r\n" % float(scipy.stats.kendalltau(a, b)[0]))


def write_arrays(name, arrays):
    """one array per line: name count v0 v1 ... (float64 repr)"""
    with open(os.path.join(HERE, name), "w") as f:
        for key, a in arrays:
            a = np.asarray(a, dtype=np.float64).ravel()
            f.write("%s %d %s\n" % (key, a.size, " ".join(repr(float(v)) for v in a)))


def bt_ref():
    """Bradley-Terry loss (margin + centering) of an MLP head (GELU), PoE loss of two linear
    heads, and 3 full-batch AdamW steps of a linear BT head, in PyTorch (spec 0.1, 1.2)."""
    import torch
    import torch.nn.functional as F
    torch.set_default_dtype(torch.float64)
    rng = np.random.default_rng(3)
    B, d, H, db = 5, 7, 6, 3
    xw, xl = rng.normal(size=(B, d)), rng.normal(size=(B, d))
    margin = rng.uniform(0, 0.5, B)
    w1, b1 = rng.normal(0, 0.4, (H, d)), rng.normal(0, 0.1, H)
    w2 = rng.normal(0, 0.4, (1, H))
    center = 0.05
    P = [torch.tensor(a, requires_grad=True) for a in (w1, b1, w2)]

    def mlp(x):  # no output bias (it cancels in BT margins), as HF's reward score head
        return (F.gelu(torch.tensor(x) @ P[0].T + P[1]) @ P[2].T).squeeze(1)

    rw, rl = mlp(xw), mlp(xl)
    loss = -F.logsigmoid(rw - rl - torch.tensor(margin)).mean() + center * ((rw + rl) ** 2).mean()
    loss.backward()
    out = [("xw", xw), ("xl", xl), ("margin", margin), ("center", [center]), ("w1", w1), ("b1", b1), ("w2", w2),
           ("mlp_loss", [loss.item()])] + [("mlp_g" + k, p.grad.numpy()) for k, p in zip(("w1", "b1", "w2"), P)]
    # PoE: main linear head on x, bias linear head on xb (no noise: the loss itself)
    xbw, xbl = rng.normal(size=(B, db)), rng.normal(size=(B, db))
    mw = torch.tensor(rng.normal(0, 0.5, (1, d)), requires_grad=True)
    bw = torch.tensor(rng.normal(0, 0.5, (1, db)), requires_grad=True)
    dm = (torch.tensor(xw) @ mw.T - torch.tensor(xl) @ mw.T).squeeze(1)
    dbias = (torch.tensor(xbw) @ bw.T - torch.tensor(xbl) @ bw.T).squeeze(1)
    ploss = -F.logsigmoid(dm + dbias).mean()
    ploss.backward()
    out += [("xbw", xbw), ("xbl", xbl), ("poe_mw", mw.detach().numpy()), ("poe_bw", bw.detach().numpy()),
            ("poe_loss", [ploss.item()]), ("poe_gmw", mw.grad.numpy()), ("poe_gbw", bw.grad.numpy())]
    # 3 AdamW steps, full batch, constant lr 0.01, decay 0.1, float32
    torch.set_default_dtype(torch.float32)
    lw = torch.tensor(rng.normal(0, 0.3, (1, d)), dtype=torch.float32, requires_grad=True)
    w0 = lw.detach().numpy().copy()
    opt = torch.optim.AdamW([lw], lr=0.01, weight_decay=0.1)
    X_w, X_l = torch.tensor(xw, dtype=torch.float32), torch.tensor(xl, dtype=torch.float32)
    for _ in range(3):
        opt.zero_grad()
        l = -F.logsigmoid((X_w @ lw.T - X_l @ lw.T).squeeze(1)).mean()
        l.backward()
        opt.step()
    out += [("train_w0", w0), ("train_w3", lw.detach().numpy())]
    write_arrays("bt_ref.txt", out)


if __name__ == "__main__":
    lowess_ref()
    rc_ref()
    metrics_ref()
    bt_ref()
