"""Each seat's condition row: the voice/emotion values a model was trained with, summed into one
LM input row per seat (SeatLMGen.set_condition_row).

Conditioned models (speaker/emotion LUTs summed into the input) start every seat on each
conditioner's first value; a seat's row is overwritten when its caller chooses. An unconditioned
checkpoint (e.g. Kyutai's Moshiko) has no conditioners: every choice is ignored.
"""

from __future__ import annotations

import torch
from moshi.conditioners import ConditionAttributes

from agent.errors import ConditionError
from agent.models import LoadedModel


class SeatConditions:
    """The conditioners' known values, each seat's defaults, and the row for a choice of values."""

    def __init__(self, model: LoadedModel):
        self.lm = model.lm
        self.values = model.condition_values
        self.defaults = {name: values[0] for name, values in self.values.items()}

    def initial_tensors(self, num_seats: int) -> dict | None:
        """Every seat on the defaults, for LMGen's `condition_tensors`; None for an unconditioned LM."""
        if self.lm.fuser is None:
            return None
        every = [ConditionAttributes(text=dict(self.defaults))] * num_seats
        return self.lm.condition_provider.prepare_and_provide(every)

    def row(self, conditions: dict[str, str]) -> torch.Tensor:
        """The LM's summed condition for one seat, shape [1, dim]."""
        with torch.no_grad():
            tensors = self.lm.condition_provider.prepare_and_provide([ConditionAttributes(text=dict(conditions))])
            return self.lm.fuser.get_sum(tensors).to(self.lm.dtype)[0]

    def default_row(self) -> torch.Tensor | None:
        """A new caller's row; None for an unconditioned LM."""
        return self.row(self.defaults) if self.defaults else None

    def choose(self, conditions: dict[str, str]) -> tuple[dict[str, str], torch.Tensor] | None:
        """The values (defaults where not chosen) and their row; None for an unconditioned LM.
        Raises ConditionError for a conditioner or value the model does not know."""
        if not self.values:
            return None
        for name, value in conditions.items():
            known = self.values.get(name)
            if known is None:
                raise ConditionError(f"this model has no {name!r} conditioning")
            if value not in known:
                raise ConditionError(f"{name} {value!r} is not one this model was trained with: {known}")
        values = self.defaults | conditions
        return values, self.row(values)
