"""A training progress bar with ETA in steps and tokens, beside (not instead of) the one-line step log."""

from __future__ import annotations

import sys


class TrainProgress:
    """tqdm bar over optimizer steps whose postfix counts tokens: `tokens 1.2M/9.8M`, tqdm's ETA from the step rate.

    The step log lines go through `write`, which prints them above the bar. Off a TTY (a log file, a test, rank > 0)
    there is no bar and `write` is a plain print, so log lines are exactly what they were without it.
    """

    def __init__(self, total_steps: int, start_step: int, tokens_per_step: float, enabled: bool = True):
        """Args:
        total_steps, start_step: the run's last step and the step it starts after (a resume starts mid-way).
        tokens_per_step: expected tokens per step, for the token total (exact for packed rows, a mean otherwise).
        enabled: False on ranks other than 0; the bar also stays off when stderr is not a terminal.
        """
        self.tokens_per_step = tokens_per_step
        self.total_tokens = tokens_per_step * total_steps
        self.tokens = tokens_per_step * start_step
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False,
                            desc="train")  # fmt: skip

    def update(self, tokens: float) -> None:
        """One optimizer step done, which trained on `tokens` tokens."""
        self.tokens += tokens
        if self.bar is not None:
            self.bar.set_postfix_str(f"tokens {_si(self.tokens)}/{_si(self.total_tokens)}", refresh=False)
            self.bar.update(1)

    def write(self, line: str) -> None:
        if self.bar is None:
            print(line, flush=True)
        else:
            self.bar.write(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _si(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"
