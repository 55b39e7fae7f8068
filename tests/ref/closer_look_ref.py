#!/usr/bin/python3
"""Reference values for tests/test_closer_look.c (moe.h >>moe:closer_look), written to
closer_look_ref.txt beside this script by scipy (Debian's python3-scipy):

    /usr/bin/python3 tests/ref/closer_look_ref.py

Two series with ties in both (small integers), and their Kendall tau-b and Pearson R as
scipy.stats.kendalltau and scipy.stats.pearsonr compute them; a third series without ties.
"""
import os

import numpy as np
from scipy import stats

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    rng = np.random.default_rng(11)
    n = 40
    x = rng.integers(0, 8, n).astype(float)         # many ties
    y = np.floor(x / 2 + rng.integers(0, 4, n))     # ties, correlated with x
    z = rng.normal(size=n)                           # no ties
    lines = [
        "x=" + ",".join(repr(float(v)) for v in x),
        "y=" + ",".join(repr(float(v)) for v in y),
        "z=" + ",".join(repr(float(v)) for v in z),
        "kendall_xy=%r" % float(stats.kendalltau(x, y)[0]),
        "kendall_xz=%r" % float(stats.kendalltau(x, z)[0]),
        "kendall_yz=%r" % float(stats.kendalltau(y, z)[0]),
        "pearson_xy=%r" % float(stats.pearsonr(x, y)[0]),
        "pearson_xz=%r" % float(stats.pearsonr(x, z)[0]),
    ]
    with open(os.path.join(HERE, "closer_look_ref.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("closer_look_ref.txt: %d series of %d, tau-b and Pearson R" % (3, n))


if __name__ == "__main__":
    main()
