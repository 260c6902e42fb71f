"""Stopping rules for a training stream that skips too much: a stream whose samples all fail would otherwise wait
forever for its first batch.

Two rules, checked per source within each partition of the stream (see :mod:`clipforge.data.stream`):

* **no usable sample in a whole pass**: after a source's first pass the partition knows how many samples a pass
  holds; once more failures than a pass plus the shuffle buffer came out in a row, no sample of a pass decoded.
  A pass that holds no sample at all (every shard missing) stops at once. Always on.
* **too large a share skipped**: among a source's first ``window`` samples, more than ``max_skip_fraction``
  skipped (by default half of the first thousand). Checked as soon as the share can no longer stay under the
  limit; ``max_skip_fraction=1`` turns the rule off.

The guard only decides; the stream turns its verdict into a :class:`StreamFailure` value, and the trainer stops
with it (exit status 1), printing the per-reason counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

# What to check first, by the reason most samples were skipped for.
_ADVICE = {
    "missing_image": "the image files named by the data do not exist: check the paths (relative paths are read "
    "against the table's folder, or its 'root' option)",
    "image_missing": "the image files do not exist: check the paths",
    "unreadable_image_file": "the image files cannot be read: check their permissions",
    "empty_caption": "the captions are empty: check the caption column or the .txt sidecar files",
    "missing_caption": "the samples have no caption: check the caption column or the .txt sidecar files",
    "image_too_large": "the images exceed data.max_pixels: raise it, or resize the images first",
    "malformed_row": "the table's rows do not parse: check its columns and quoting",
}
_DEFAULT_ADVICE = "the images cannot be decoded: check the files (open one with an image viewer)"


@dataclass(frozen=True)
class SkipPolicy:
    """When a stream that skips samples should stop instead of going on."""

    max_skip_fraction: float = 0.5  # stop if more than this share of a source's first `window` samples fail
    window: int = 1000


@dataclass(frozen=True)
class StreamFailure:
    """Yielded by a stream in place of a batch when it cannot give usable samples; the message names the source,
    the rule that fired, the counts by reason and what to check."""

    message: str
    counts: dict[str, int] = field(default_factory=dict)


def _listing(counts: Counter[str]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in counts.most_common()) or "none"


class SkipGuard:
    """Per-source tallies of decoded and skipped samples in one partition, and the two stopping rules."""

    def __init__(
        self,
        source_names: Sequence[str],
        policy: SkipPolicy,
        *,
        buffer_size: int,
        partition: int = 0,
        partitions: int = 1,
    ) -> None:
        if not 0.0 <= policy.max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {policy.max_skip_fraction}")
        if policy.window < 1:
            raise ValueError(f"window must be at least 1, got {policy.window}")
        self.names = list(source_names)
        self.policy = policy
        self.buffer_size = max(0, buffer_size)
        self.where = f" (data partition {partition} of {partitions})" if partitions > 1 else ""
        count = len(self.names)
        self.attempts = [0] * count
        self.skipped = [0] * count
        self.in_a_row = [0] * count
        self.pass_size: list[int | None] = [None] * count
        self.reasons: list[Counter[str]] = [Counter() for _ in range(count)]
        self.examples: list[dict[str, str]] = [{} for _ in range(count)]  # first sample skipped per reason

    def pass_end(self, source: int, samples: int) -> StreamFailure | None:
        """Source ``source`` finished a pass holding ``samples`` raw samples for this partition."""
        if samples == 0:
            return self._failure(
                source,
                f"source '{self.names[source]}' gave no samples in a whole pass{self.where}; its shards are "
                "missing or unreadable, or there are more data workers x ranks than data: use fewer workers or "
                "more data",
            )
        self.pass_size[source] = samples
        return None

    def record(self, source: int, reason: str | None, example: str = "") -> StreamFailure | None:
        """One sample of ``source`` came out of the buffer: decoded (``reason`` None) or skipped for ``reason``;
        ``example`` names it (a file or tar member) for the message."""
        self.attempts[source] += 1
        if reason is None:
            self.in_a_row[source] = 0
            return None
        self.skipped[source] += 1
        self.in_a_row[source] += 1
        self.reasons[source][reason] += 1
        if example:
            self.examples[source].setdefault(reason, example)
        name, size = self.names[source], self.pass_size[source]
        if size is not None and self.in_a_row[source] > size + self.buffer_size:
            return self._failure(
                source,
                f"source '{name}' gave no usable sample in a whole pass ({size} samples{self.where}; "
                f"{self.in_a_row[source]} skipped in a row)",
            )
        window, fraction = self.policy.window, self.policy.max_skip_fraction
        if fraction < 1.0 and self.attempts[source] <= window and self.skipped[source] > fraction * window:
            return self._failure(
                source,
                f"source '{name}': {self.skipped[source]} of its first {self.attempts[source]} samples were "
                f"skipped{self.where}, more than {fraction:.0%} of {window} (data.max_skip_fraction, "
                "data.skip_window)",
            )
        return None

    def _failure(self, source: int, what: str) -> StreamFailure:
        reasons = self.reasons[source]
        top = reasons.most_common(1)[0][0] if reasons else ""
        advice = _ADVICE.get(top, _DEFAULT_ADVICE if top.startswith("image_") else "")
        text = f"{what}. Skipped by reason: {_listing(reasons)}."
        if top in self.examples[source]:
            text += f" First {top}: {self.examples[source][top]}."
        if advice:
            text += f" Likely cause: {advice}."
        return StreamFailure(text, dict(reasons))
