"""The guided (grammar) rows of a step and their token bitmasks, for LLMEngine's sampler call.

A row is guided when its request still runs and its choice has a grammar position (ChoiceState.guide).
Masks are int32 [G, ceil(V/32)] (pipeline/guided.py): filled on MaskFiller's threads while the forward pass
runs (`start`, a Future), or here and now (`fill`, the engine's row-by-row fallback).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gearshift.engine.request_state import RequestState
    from gearshift.engine.sequence import Sequence


class GrammarRows:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._filler: Any = None  # pipeline/guided.MaskFiller, made for the first guided step

    @staticmethod
    def rows(targets: list[Sequence], requests: Mapping[str, RequestState]) -> tuple[list[int], list[Any]]:
        """The rows of guided choices and their guides; rows without a grammar are skipped."""
        rows: list[int] = []
        guides: list[Any] = []
        for row, seq in enumerate(targets):
            req = requests.get(seq.request_id)
            guide = req.choices[seq.index].guide if req is not None else None
            if guide is not None:
                rows.append(row)
                guides.append(guide)
        return rows, guides

    def start(self, targets: list[Sequence], requests: Mapping[str, RequestState]) -> tuple[list[int], Any] | None:
        """Start filling the guided rows' bitmasks (a Future) so the fill overlaps the forward pass; None
        when no row is guided."""
        rows, guides = self.rows(targets, requests)
        if not guides:
            return None
        if self._filler is None:
            from gearshift.engine.pipeline.guided import MaskFiller

            self._filler = MaskFiller(self.vocab_size)
        return rows, self._filler.start(guides)

    def fill(self, targets: list[Sequence], requests: Mapping[str, RequestState]) -> tuple[list[int], Any] | None:
        """Like start, filled here and now."""
        rows, guides = self.rows(targets, requests)
        if not guides:
            return None
        from gearshift.engine.pipeline.guided import fill_bitmask

        return rows, fill_bitmask(guides, self.vocab_size)
