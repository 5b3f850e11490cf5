"""Configuration models of the boundary analysis (pydantic, ``extra="forbid"``)."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stemagent.boundaries.chain import ReducedParams


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BoundaryChainConfig(_Model):
    """The seven reduced parameters of a boundary motif chain (see stemagent.boundaries.chain)."""

    a: float = Field(0.5, ge=0, le=1, description="X -> X (a zig-zag continues)")
    b: float = Field(0.3, ge=0, le=1, description="X -> Y2")
    c: float = Field(0.4, ge=0, le=1, description="Y1 -> X")
    d: float = Field(0.6, ge=0, le=1, description="Y2 -> Y1 as a stair (else as a U)")
    f: float = Field(0.8, ge=0, le=1, description="Z -> X")
    g: float = Field(0.2, ge=0, le=1, description="Z -> Y2")
    k: float = Field(0.1, ge=0, le=1, description="Y1 -> Z")

    @model_validator(mode="after")
    def _rows(self) -> "BoundaryChainConfig":
        for pair in (("a", "b"), ("c", "k"), ("f", "g")):
            total = getattr(self, pair[0]) + getattr(self, pair[1])
            if total > 1.0 + 1e-9:
                raise ValueError(f"{pair[0]}+{pair[1]}={total:.6g}: must not exceed 1")
        return self

    def params(self) -> ReducedParams:
        return ReducedParams(**self.model_dump())


class BoundaryTraceConfig(_Model):
    """Reading boundaries from atomic columns (lattice registration of the boundary sublattice)."""

    finder_sigma_A: float = Field(0.6, gt=0.05, le=5.0, description="frames: LoG atom finder width, Å")
    finder_threshold: float = Field(0.1, ge=0.0, le=1.0, description="frames: LoG threshold (fraction of the 99.5th percentile)")
    finder_min_separation_A: float = Field(1.5, gt=0.0, le=10.0, description="frames: minimum distance between columns, Å")
    edge_margin_A: float = Field(1.0, ge=0, le=20.0, description="frames: columns closer than this to the image border are ignored (their peaks are cut)")
    column_class: str = Field("A", description="class name of the boundary sublattice when the atoms carry classes")
    brightest_fraction: Optional[float] = Field(
        None, gt=0, le=1, description="without classes: the boundary sublattice is this fraction of the brightest columns (None: 2-means on intensity)")
    displacement_A: Optional[float] = Field(None, gt=0, le=2.0, description="expected displacement of a boundary column (None: estimated)")
    min_sigmas: float = Field(6.0, gt=1, le=100, description="a column is a boundary candidate when its displacement exceeds this many noise sigmas")
    neighbourhood_cells: float = Field(2.6, gt=1, le=10, description="radius of the local reference, lattice spacings")
    min_steps: int = Field(3, ge=1, le=1000, description="shortest boundary reported, steps")


class BoundaryAnalysisConfig(_Model):
    """What ``stemagent analyze-boundaries`` computes."""

    trace: BoundaryTraceConfig = Field(default_factory=BoundaryTraceConfig)
    min_step_confidence: float = Field(0.5, ge=0, le=1, description="steps read with a lower posterior are treated as unread")
    dirichlet_prior: float = Field(0.5, gt=0, le=10, description="symmetric Dirichlet smoothing of the full matrix")
    fixed: dict[str, float] = Field(default_factory=dict, description="reduced parameters held fixed, e.g. {k: 0, g: 0, f: 1}")
    cv_folds: int = Field(5, ge=2, le=50)
    kmotif_ks: tuple[int, ...] = (4, 5, 6, 7, 8)
    kmotif_boot: int = Field(2000, ge=99, le=100000)
    kmotif_alpha: float = Field(0.05, gt=0, lt=1)
    omega_n_max: int = Field(40, ge=8, le=200, description="largest N of the exact transfer matrix")
    omega_n_min: int = Field(8, ge=3, le=100)
    alpha_d_values: tuple[float, ...] = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)
    seed: int = 0
