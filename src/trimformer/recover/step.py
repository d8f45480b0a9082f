"""`recover` as a recipe step: prune steps, then heal, or prune a little, heal, repeat (Adapt-Pruner style).

    steps:
      - {method: wanda, sparsity: 0.25}
      - {method: recover, steps: 100, teacher: dense}
      - {method: wanda, sparsity: 0.5}
      - {method: recover, steps: 100}

The step trains on the recipe's calibration windows. teacher: 'dense' is the model as it was before the
recipe's first step (`prune_` keeps a copy when a step asks for it); anything else is loaded with
`trimformer.load` (a bundled name, a folder, a .gguf file). Settings take their flat names (above) or
the nested form (`{method: recover, lora: {rank: 8}}`); `filter_fn` limits what trains (see `recover_`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..models import Anatomy
from ..models.load import load
from ..registry import Registry
from ..steps import StepContext
from .config import RecoverConfig
from .train import recover_

RECOVER: Registry = Registry("recover")


@RECOVER.register("recover")
@dataclass(init=False)
class RecoverStep(RecoverConfig):
    """Every RecoverConfig field, plus `teacher`: 'dense' (the model before the recipe) or a model to load."""

    teacher: str = "dense"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ValueError(f"teacher must be 'dense' or a model name / folder, got {self.teacher!r}")

    @property
    def needs_dense(self) -> bool:
        return self.teacher == "dense"

    def config(self) -> RecoverConfig:
        return RecoverConfig(**{f.name: getattr(self, f.name) for f in fields(RecoverConfig) if f.init})

    needs_calibration = True

    def apply_(self, anatomy: Anatomy, run: StepContext) -> dict:
        calibration, progress = run.calibration, run.progress
        if calibration is None:
            raise ValueError("the recover step trains on the calibration windows; give calibration data")
        if self.needs_dense:
            if run.dense is None:
                raise ValueError("teacher 'dense' is the model before the recipe; run the recipe through "
                                 "trimformer.prune_, or name a teacher model (teacher: smollm2-135m)")
            teacher = run.dense
        else:
            teacher = load(self.teacher)
        model = anatomy.model
        recover_(model, teacher, calibration, self.config(), filter_fn=run.filter_fn, progress=progress)
        return model.trimformer_history.pop()["result"]  # prune_ records the step itself
