"""Type stub for the compiled scoring kernel (kernel/score.pyx)."""

import numpy as np
import numpy.typing as npt

from kernel.calibration import CalibrationTable
from kernel.columns import ScoreColumns
from kernel.spec import ModelSpec

class Scorer:
    spec: ModelSpec
    calibration: CalibrationTable | None
    def __init__(self, spec: ModelSpec, calibration: CalibrationTable | None = None) -> None: ...
    @property
    def n_variables(self) -> int: ...
    def score(
        self,
        features: npt.NDArray[np.float32] | npt.NDArray[np.float64],
        adult: npt.NDArray[np.uint8],
        out: ScoreColumns | None = None,
        n_threads: int = 1,
    ) -> ScoreColumns: ...
    def bind(
        self,
        features: npt.NDArray[np.float32] | npt.NDArray[np.float64],
        adult: npt.NDArray[np.uint8],
        out: ScoreColumns,
    ) -> RowScorer: ...

class RowScorer:
    features: np.ndarray
    adult: np.ndarray
    out: ScoreColumns
    def rescore(self, row: int) -> int: ...

def normal_quantile(p: npt.ArrayLike) -> npt.NDArray[np.float64]: ...
