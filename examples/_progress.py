"""Progress of the examples' training loops (shared by finetune_minilm.py and distill_llama.py)."""
from __future__ import annotations

import time


class Progress:
    """The progress of a loop of ``total`` steps: a tqdm bar on stderr (removed when done) when
    tqdm is installed, else a line on stdout every ``every`` seconds. Disabled: silent."""

    def __init__(self, total: int, desc: str, enabled: bool = True, every: float = 5.0) -> None:
        self.total, self.desc, self.enabled, self.every = total, desc, enabled, every
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.update(1)
        elif self.enabled and step < self.total:
            now = time.perf_counter()
            if now - self.last >= self.every:
                self.last = now
                print(f"  {self.desc}: step {step}/{self.total}, loss {loss:.3f} ({now - self.t0:.0f} s)",
                      flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
