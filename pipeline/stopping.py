"""The stopping rule: which requests train, how long the steps are, and when the run ends.

One object holds every decision the loop takes from what a check saw (pipeline/method.md,
"Stopping at a stranger's level" and "Holding the line"):
- a request's standing at a look: remembered, forgotten, or erased too deep (past the
  strangers' band);
- which requests train next: the remembered ones, the too-deep ones when the method can pull
  back, and with the hold (`recover_within`) the forgotten ones too, held in the band (the
  requests earlier runs erased as well: the set's membership AUC covers them);
- the lr back-off: a request trained since its last look that jumped from one side of the band
  to the other multiplies the lr of every later step by `lr_backoff`;
- why the run stops: every request forgotten and the run settled (the neighbours' MA back
  within `recover_within` of the original's, from below or above (only from below when the run
  repairs drift towards an earlier model), the set's LOSS AUC against strangers within
  `mia_within` of 0.5); the paper's set-level rule (`stop.rule: set`); only too-deep requests left
  that the method cannot pull back; the epoch cap.
Pure: no model, no I/O, no distributed calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def standing(record: dict) -> str:
    """Which side of the line a looked-at request is on."""
    return "too_deep" if record["too_deep"] else "forgotten" if record["forgotten"] else "remembered"


@dataclass(frozen=True)
class StopRule:
    max_epochs: int
    stop: str = "each"  # each: every request on its own; set: also the set's mean (the paper's rule)
    pull_back: bool = False  # the method has a band: a request erased too deep trains back into it
    recover_within: float | None = None  # the hold: forgotten requests train on, held, until the neighbours recover
    mia_within: float | None = None  # ... and until the set is as familiar as strangers
    lr_backoff: float = 1.0
    repair: bool = False  # the retained text is held to a model before this run's start (a chained run)

    @classmethod
    def of(cls, unlearning, band: bool, repair: bool = False) -> StopRule:
        """The rule an `UnlearningConfig` describes, for a method with (`band`) or without a band."""
        s = unlearning.stop
        return cls(
            max_epochs=s.max_epochs,
            stop=s.rule,
            pull_back=band,
            recover_within=s.recover_within,
            mia_within=s.mia_within,
            lr_backoff=unlearning.optim.lr_backoff,
            repair=repair,
        )

    @property
    def hold(self) -> bool:
        return self.recover_within is not None

    def needs_training(self, record: dict) -> bool:
        """Remembered, or erased too deep when the method can pull it back."""
        return not record["forgotten"] and (not record["too_deep"] or self.pull_back)

    def trains(self, record: dict) -> bool:
        """Whether a request is in the next steps' batches: it needs training, or it is held."""
        return self.needs_training(record) or self.hold and record["forgotten"]

    def jumped(self, before: dict[int, dict], after: dict[int, dict], trained: set[int]) -> list[int]:
        """Requests trained since their last look that went from remembered to too deep, or back:
        the steps in between were longer than the band is wide."""
        return [
            i
            for i in sorted(trained)
            if i in before and i in after and {standing(before[i]), standing(after[i])} == {"remembered", "too_deep"}
        ]

    def backed_off(self, scale: float, jumped: list[int]) -> float:
        """The lr factor after a look at which `jumped` requests crossed the band."""
        return scale * self.lr_backoff if jumped else scale

    def recovered(self, neighbour_ma: list[float]) -> bool:
        """The neighbours' MA at the last check is within `recover_within` of the starting model's
        (the first check's), either way: below it the retained text was damaged, above it the model
        was taught text it had not memorized. With `repair` only below counts: the hold pulls the
        retained text back towards an earlier model that had it, which is no teaching. True without
        the hold or without neighbours."""
        if self.recover_within is None or not neighbour_ma:
            return True
        fell = neighbour_ma[0] - neighbour_ma[-1]
        return fell <= self.recover_within and (self.repair or -fell <= self.recover_within)

    def familiar(self, set_auc: list[float]) -> bool:
        """The set's LOSS AUC against the strangers at the last check is within `mia_within` of 0.5.
        True without the option or before anything is measured."""
        return self.mia_within is None or not set_auc or abs(set_auc[-1] - 0.5) <= self.mia_within

    def reason(
        self, records: list[dict], thr, epoch: int, neighbour_ma: list[float] = (), set_auc: list[float] = ()
    ) -> str | None:
        """Why training stops after this check, or None to keep going."""
        everyone = all(r["forgotten"] for r in records)
        if everyone and self.recovered(list(neighbour_ma)) and self.familiar(list(set_auc)):
            return "all_forgotten"
        if (
            self.stop == "set"
            and np.mean([r["ma"] for r in records]) < thr.ma
            and np.mean([r["el"] for r in records]) < thr.el
        ):
            return "set_thresholds"
        if not everyone and not any(self.needs_training(r) for r in records):
            return "only_too_deep_left"
        if epoch >= self.max_epochs:
            return "max_epochs"
        return None
