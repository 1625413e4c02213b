"""Progress bars for long jobs (tqdm): count, rate, ETA on stderr.

On a terminal the bar is redrawn in place; in logs (CI, nohup) it is
printed at most every 10 seconds, so logs stay short.
"""

import sys


def progress_bar(total, unit="images", enabled=True):
    """A tqdm bar over `total` items; `.update(n)` and `.close()`."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=int(total), unit=f" {unit}", disable=not enabled, file=sys.stderr,
                mininterval=0.2 if tty else 10.0, dynamic_ncols=tty, ascii=not tty)
