"""Progress reporting for the tuning runs: tqdm when it is installed, else one plain line
on stderr; nothing at all with ``progress=False``. tqdm is imported here, on first use,
never when ferroptim is imported."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """A progress bar over ``total`` iterations, or a stand-in that prints nothing."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.count = 0
        self.postfix = ""
        self._bar: Any = None
        if enabled:
            self._bar = _make_tqdm(total, desc)

    def update(self, **values: float) -> None:
        self.count += 1
        if not self.enabled:
            return
        self.postfix = " ".join(f"{key}={value:.3g}" for key, value in values.items())
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix, refresh=False)
            self._bar.update(1)
        elif sys.stderr.isatty():
            # An interactive terminal gets one line redrawn in place.
            sys.stderr.write(f"\r{self._line()}")
            sys.stderr.flush()

    def close(self, note: str = "") -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(f"{self.postfix} {note}".strip())
            self._bar.close()
            return
        # Without a terminal (logs, CI, pytest) only the final line is written.
        end = f" ({note})" if note else ""
        prefix = "\r" if sys.stderr.isatty() else ""
        sys.stderr.write(f"{prefix}{self._line()}{end}\n")
        sys.stderr.flush()

    def _line(self) -> str:
        return f"{self.desc}: {self.count}/{self.total} {self.postfix}".rstrip()


def _make_tqdm(total: int, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr)
