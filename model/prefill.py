"""How a new prompt is prefilled while other sequences decode: the prefill policy.

A step that carries prompt tokens holds every running stream for its whole length, and on a CPU
prefill is compute-bound: a chunk of a few dozen tokens costs nearly as much per token as
decoding, while a few hundred go several times faster per token. So both "many small chunks,
one in every step" (the streams crawl for the whole prefill and the prompt waits long, because
small chunks prefill slowly) and "the whole prompt at once" (the streams freeze for all of it)
lose. The policy here is time-sliced:

- Chunks are big: each step that prefills is sized, from measured speed, to take about
  `stall_seconds` (the longest a running stream is held between two of its tokens).
- Between them, decode-only steps run until prefill has had no more than `share` of the time
  since the prompt began: after a chunk that added `x` seconds to a step, the streams decode
  alone for `x * (1 - share) / share` seconds. On a GPU, where a chunk adds little to a decode
  step, that is a step or less, so prefill rides along nearly every step.

`stall_seconds` bounds the streams' largest gap; `share` moves the balance between the new
prompt's time to first token (higher) and the running streams' pace (lower). Both come from the
worker's settings (PREFILL_STALL_SECONDS, PREFILL_SHARE). When nothing else decodes a prompt goes
in whole batches, as fast as it can.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillPolicy:
    stall_seconds: float = 0.6
    share: float = 0.9
    first_chunk: int = 64  # before anything is measured: 0.2-0.4 s on a 2-core CPU, little on a GPU
    min_chunk: int = 16
    max_chunk: int = 2048  # llama.cpp's default batch (n_batch): more is split by it anyway

    def __post_init__(self) -> None:
        if self.stall_seconds <= 0 or not 0 < self.share <= 1:
            raise ValueError("stall_seconds must be > 0 and share in (0, 1]")


class PrefillPace:
    """The policy applied, step by step, from the steps' measured seconds (no clock of its own).

    The backend asks `chunk()` before each step while something decodes (0: decode only this
    step) and reports every step to `observe()`.
    """

    # The latest step's cost alone: a prompt token costs more the further in it lies (attention
    # over a longer context: on the embedded model on 2 cores, about 3 ms at position 250 and
    # 9 ms at 3,000), so an average of earlier chunks would size each next one too big.
    SMOOTHING = 1.0

    def __init__(self, policy: PrefillPolicy | None = None) -> None:
        self.policy = policy or PrefillPolicy()
        self._decode_s: float | None = None  # a decode-only step, smoothed
        self._prefill_token_s: float | None = None  # one prompt token's share of a mixed step
        self._owed_s = 0.0  # decode-only time the streams are owed before the next chunk

    def chunk(self) -> int:
        if self._owed_s > 0:
            return 0
        p = self.policy
        if self._prefill_token_s is None:
            return p.first_chunk
        room = p.stall_seconds - (self._decode_s or 0.0)
        return max(p.min_chunk, min(p.max_chunk, int(room / self._prefill_token_s)))

    def observe(self, seconds: float, *, decoded: int, prefilled: int) -> None:
        if prefilled == 0:
            self._decode_s = self._smooth(self._decode_s, seconds)
            self._owed_s = max(0.0, self._owed_s - seconds)
            return
        decode_share = self._decode_s if decoded and self._decode_s is not None else 0.0
        extra = max(seconds - decode_share, 0.0)
        if extra > 0:  # a chunk lost in the noise of a decode step's time says nothing of its cost
            self._prefill_token_s = self._smooth(self._prefill_token_s, extra / prefilled)
        share = self.policy.share
        self._owed_s = extra * (1 - share) / share if decoded else 0.0

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.SMOOTHING * (new - old)
