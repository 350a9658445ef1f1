"""The progress bar every long call shows (generate, a server's generate, compare): tqdm's, a notebook bar in
Jupyter, with steps per second."""
from __future__ import annotations

import sys


def progress_bar(total: int, progress: bool | None, rows: int = 1):
    """tqdm.auto (a notebook bar in Jupyter) with steps/s; by default only for runs longer than 2 s."""
    if progress is False:
        return None
    from tqdm.auto import tqdm

    desc = "decoding" if rows == 1 else f"decoding {rows} rows"
    return tqdm(total=total, unit="tok" if rows == 1 else "step", desc=desc, delay=0 if progress else 2.0,
                leave=False, file=sys.stderr)
