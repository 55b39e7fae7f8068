#!/usr/bin/python3
"""statsmodels' LOWESS (the routine the post-hoc calibration paper calls), timed for bench/lowess.c.

    /usr/bin/python3 bench/statsmodels_lowess.py IN OUT FRAC IT REPEATS

IN: lines "x y"; OUT: the fits (input order), one per line. Prints one key=value line with the
median wall time of REPEATS runs. Needs Debian's python3-statsmodels (and numpy)."""
import sys
import time

import numpy as np
from statsmodels.nonparametric.smoothers_lowess import lowess


def main():
    path_in, path_out, frac, it, repeats = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    data = np.loadtxt(path_in, ndmin=2)
    x, y = data[:, 0].copy(), data[:, 1].copy()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fit = lowess(y, x, frac=frac, it=it, delta=0.0, return_sorted=False)
        times.append(time.perf_counter() - t0)
    with open(path_out, "w") as f:
        f.write("\n".join(repr(float(v)) for v in fit) + "\n")
    print("bench=lowess_statsmodels n=%d frac=%g it=%d repeats=%d median_ms=%.3f"
          % (len(x), frac, it, repeats, 1000 * float(np.median(times))))


if __name__ == "__main__":
    main()
