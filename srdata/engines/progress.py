"""The scoring progress bar every engine shows: rows finished, tokens/s alongside."""

from __future__ import annotations

import time


class ProgressBar:
    """tqdm bar fed by the backends: rows finished, with tokens/s alongside."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="row", desc="scoring", disable=not enabled, dynamic_ncols=True)
        self.tokens = 0
        self.start = self.shown = time.perf_counter()

    def update_work(self, rows: int, tokens: int) -> None:
        """Backends report tokens as they go (per batch, per decode step) and rows as they finish."""
        self.tokens += tokens
        now = time.perf_counter()
        self.bar.set_postfix_str(f"{self.tokens / max(now - self.start, 1e-9):,.0f} tok/s", refresh=False)
        if rows:
            self.bar.update(rows)  # tqdm refreshes, with rows/s and the ETA
        elif now - self.shown >= 1.0:  # no row finished yet (long batches): still show the tokens moving
            self.bar.refresh()
        else:
            return
        self.shown = now

    def close(self) -> None:
        self.bar.close()
