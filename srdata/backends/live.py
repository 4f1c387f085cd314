"""Progress and Ctrl-C for local backends: what one batch has done while it runs.

A batch of 64 long answers can take minutes on a CPU. While it decodes, each step's new
tokens are reported (tokens/s moves from the first seconds), and each row is reported the
step it produces a stop token (rows and the ETA move before the batch ends). The ids of
the rows that stopped are kept, so a Ctrl-C in the middle of the batch still returns
them: :class:`BackendInterrupted` carries every row a call had finished.

Example:
    >>> live = LiveBatch(lambda rows, tokens: print(rows, tokens))
    >>> live.add(5)
    0 5
    >>> live.finish(2, 12)
    2 7
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from srdata.backends.base import Generation, ProgressCallback


class BackendInterrupted(KeyboardInterrupt):
    """Ctrl-C inside a backend call, with the rows it had finished (by input position).

    ``losses[i]`` is the reference's mean NLL of input ``i`` and ``generations[i]`` its
    answer, for the inputs whose work was complete when the interrupt came; a caller that
    does not look at them sees a plain ``KeyboardInterrupt``.
    """

    def __init__(self, losses: dict[int, float] | None = None, generations: dict[int, Generation] | None = None) -> None:
        super().__init__("interrupted")
        self.losses = losses or {}
        self.generations = generations or {}


class LiveBatch:
    """Progress of one batch while it runs: tokens as computed, rows as they stop, the rest at the end."""

    def __init__(self, progress: ProgressCallback) -> None:
        self.progress = progress
        self.reported = 0
        self.rows_reported = 0
        self.stopped: dict[int, list[int]] = {}  # batch row -> answer ids (stop token excluded), rows that stopped
        self.losses: list[float] | None = None  # the batch's reference losses once computed

    def add(self, tokens: int) -> None:
        if self.progress and tokens:
            self.reported += tokens
            self.progress(0, tokens)

    def row_stopped(self, row: int, ids: list[int]) -> None:
        """Row ``row`` produced a stop token during decoding: its answer is final."""
        self.stopped[row] = ids
        if self.progress:
            self.rows_reported += 1
            self.progress(1, 0)

    def finish(self, rows: int, tokens: int) -> None:
        if self.progress:
            self.progress(rows - self.rows_reported, tokens - self.reported)

    def interrupted(self, batch: Sequence[int], decode: Callable[[list[int]], str], losses: Sequence[Any], results: Sequence[Any]) -> BackendInterrupted:
        """The interrupt to raise: rows of earlier batches (``losses``/``results`` not None) and this batch's stopped rows."""
        done_losses = {i: loss for i, loss in enumerate(losses) if loss is not None and loss == loss}
        done = {i: g for i, g in enumerate(results) if g is not None}
        if self.losses is not None:
            for row, ids in self.stopped.items():
                done_losses[batch[row]] = self.losses[row]
                done[batch[row]] = Generation(ids, decode(ids), "stop")
        return BackendInterrupted(done_losses, done)


def decode_watcher(live: LiveBatch, stop_ids: list[int], prompt_width: int) -> Any:
    """A transformers ``StoppingCriteria`` that never stops generation: it reports each decode
    step's new tokens and the rows that produce a stop token into ``live``."""
    import torch
    from transformers import StoppingCriteria

    class DecodeSteps(StoppingCriteria):
        def __init__(self) -> None:
            self.stop_ids = torch.tensor(stop_ids or [-1])
            self.finished: torch.Tensor | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
            last = input_ids[:, -1].cpu()
            if input_ids.shape[1] > prompt_width:
                if self.finished is None:
                    self.finished = torch.zeros(len(last), dtype=torch.bool)
                live.add(int((~self.finished).sum()))
                newly = torch.isin(last, self.stop_ids) & ~self.finished
                self.finished |= newly
                for row in newly.nonzero().flatten().tolist():
                    answer = input_ids[row, prompt_width:-1].tolist()  # what generate() returns, cut at the stop token
                    live.row_stopped(row, answer)
            return torch.zeros(len(last), dtype=torch.bool, device=input_ids.device)

    return DecodeSteps()
