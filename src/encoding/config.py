"""Settings of the encoding stage, kept apart from the stage (pydantic only: the run config
imports them without paying for torch).

- :class:`EncodingConfig`: the library's settings (:class:`~stemagent.encoding.stage.EncodingStage`);
- :class:`PipelineEncodingConfig`: ``pipeline.encoding`` of a run: the same, with the defaults of
  the per-frame path (the pool is reclustered only when atoms no motif explains appear, never on
  a schedule, and then only when enough of them have been seen and not within ``min_frames_between``
  frames of the last recluster; labels from the classifier on every frame; the recluster in a
  worker thread, adopted ``recluster_adopt_after_frames`` frames later) and what goes into
  the run log's ``motifs`` stream;
- :class:`PipelineRVAEConfig`: ``pipeline.rvae`` of a run: the rVAE stage's weights and device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


SiteBlock = Literal["coordination", "intensity", "neighbour_intensity"]
SITE_BLOCKS_DEFAULT: tuple[SiteBlock, ...] = ("coordination", "intensity", "neighbour_intensity")


class EncodingConfig(BaseModel):
    """Settings of the encoding stage (lengths in Å, sizes in pixels)."""

    model_config = ConfigDict(extra="forbid")

    n_max: int = Field(10, ge=1, le=20, description="highest Zernike radial order")
    radius_factor: float = Field(1.3, gt=0.3, le=4.0, description="patch disk radius / nearest-neighbour distance")
    radius_A: float | None = Field(None, gt=0, description="fixed disk radius; None: from the first frame's atoms")
    max_radius_px: float = Field(20.0, ge=4.0, le=64.0, description="larger disks bin the frame first")
    subpixel_steps: int = Field(8, ge=2, le=32, description="patch centres quantised to 1/steps px (even)")
    correction: Literal["none", "gram"] = Field("none", description="moments: projections, or Gram-corrected least squares")
    clustering: Literal["robust", "layout", "gmm"] = Field("robust", description="see stemagent.encoding.clustering")
    components: int = Field(4, ge=1, le=64, description="principal components of the features that are clustered")
    outlier_alpha: float = Field(0.01, gt=0, lt=0.5, description="robust: chi-square tail beyond which an atom is not host")
    mode_fraction: float = Field(0.1, gt=0, lt=1, description="robust: smallest host mode, as a share of the atoms")
    n_neighbors: int = Field(10, ge=2, le=100)
    layout_iterations: int = Field(100, ge=10, le=2000)
    min_cluster_size: int = Field(3, ge=2, description="smallest motif cluster (robust, layout)")
    max_components: int = Field(10, ge=1, le=50, description="largest mixture tried (gmm)")
    novelty_sigmas: float = Field(6.0, gt=0, description="a cluster is a new motif when its mean differs from the nearest by more than this over sqrt(atoms) ...")
    novelty_min_effect: float = Field(1.0, gt=0, description="... and by more than this many noise widths of one atom, in some feature")
    library_memory: int = Field(5000, ge=10)
    pool_size: int = Field(4000, ge=10, description="recent atoms clustered together (several frames)")
    recluster_every: int = Field(1, ge=0, description="recluster the pool every n frames (0: only when atoms no motif explains appear)")
    novelty_alpha: float = Field(1e-4, gt=0, lt=0.5, description="classifier: chi-square tail beyond which an atom is unexplained")
    min_unexplained: int = Field(1, ge=1, description="recluster on novelty once this many atoms no motif explained "
                                                      "have been seen since the last recluster (counted over frames)")
    min_unexplained_fraction: float = Field(0.0, ge=0.0, le=1.0, description="... or once one frame has this share of "
                                                                           "its atoms unexplained (0: count only)")
    min_frames_between: int = Field(0, ge=0, description="frame budget: no novelty recluster within this many frames "
                                                         "of the last one (frames, not seconds: replay reproduces it)")
    relabel: bool = Field(False, description="a reclustered frame's atoms are labelled by the refitted classifier, "
                                             "like every other frame (labels do not depend on when the pool reclusters)")
    recluster_adopt_after_frames: int = Field(0, ge=0, le=20, description="frames: 0 reclusters on the frame that falls "
                                              "due; k > 0 runs a recluster due on frame n in a worker thread and "
                                              "adopts its motifs at the start of frame n + k (frames, not seconds: "
                                              "replay reproduces it; the first recluster always runs on its frame)")
    site_features: list[SiteBlock] = Field(
        default_factory=lambda: list(SITE_BLOCKS_DEFAULT),
        description="per-site blocks clustered next to the Zernike magnitudes (stemagent.encoding.site_features); "
                    "empty: Zernike only. Default all three: at 1e4 e/Å² HAADF they raise MoS2 motif agreement "
                    "93.8 -> 97.1 % and graphene 98.7 -> 99.0 % (BENCHMARKS.md)")
    coordination_weight: float = Field(10.0, ge=0, description="the soft neighbour count is multiplied by this")
    intensity_weight: float = Field(10.0, ge=0, description="the square roots of the site and neighbour intensities "
                                                            "(units of the frame's mean site intensity) are multiplied "
                                                            "by this; 10: they, not the Zernike noise, lead the "
                                                            "principal components that are clustered")
    coordination_shell: tuple[float, float] = Field((1.3, 1.55), description="a neighbour counts 1 up to the first "
                                                                              "and 0 beyond the second (x NN distance; "
                                                                              "the second shell is at 1.73 in graphene "
                                                                              "and TMDs)")
    intensity_transform: Literal["sqrt", "log"] = Field("sqrt", description="site intensities as clustered: sqrt "
                                                                           "(equal photon noise) or log (dark sites "
                                                                           "stretched further)")
    site_sigma_factor: float = Field(0.25, gt=0, le=1.0, description="site intensity: Gaussian sigma / NN distance")
    refine_iterations: int = Field(3, ge=0, le=50, description="after each recluster, reassign the pool's atoms this many "
                                                                "times to the most probable motif (shared-covariance "
                                                                "Gaussians, the motifs' shares as priors); 0: off")
    min_atoms: int = Field(8, ge=3, description="frames with fewer encoded atoms get no motifs")
    hierarchy: bool = True
    rare_fraction: float = Field(0.05, gt=0, lt=1)
    seed: int = 0
    device: str | None = Field(None, description="torch device; None: CUDA when present")
    num_threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads while encoding (restored after); "
                                                                   "None leaves torch's setting")

    @field_validator("site_features")
    @classmethod
    def _distinct_blocks(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"site_features={v}: each block at most once")
        return v

    @field_validator("coordination_shell")
    @classmethod
    def _shell(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] < v[1] <= 3.0:
            raise ValueError(f"coordination_shell={v}: must satisfy 0 < inner < outer <= 3")
        return v


class PipelineEncodingConfig(EncodingConfig):
    """``pipeline.encoding``: the encoding stage of a run (see the module docstring)."""

    recluster_every: int = Field(0, ge=0, description="recluster the pool every n frames (0: only when atoms no motif "
                                                      "explains appear; the per-frame path then only classifies)")
    min_unexplained: int = Field(16, ge=1, description="recluster on novelty once this many atoms no motif explained "
                                                       "have been seen since the last recluster (counted over frames)")
    min_unexplained_fraction: float = Field(0.05, ge=0.0, le=1.0, description="... or once one frame has this share "
                                                                            "of its atoms unexplained")
    min_frames_between: int = Field(20, ge=0, description="frame budget: no novelty recluster within this many frames "
                                                          "of the last one (frames, not seconds: replay reproduces it)")
    relabel: bool = Field(True, description="a reclustered frame's atoms are labelled by the refitted classifier")
    recluster_adopt_after_frames: int = Field(2, ge=0, le=20, description="frames: a recluster due on frame n runs in "
                                              "a worker thread, off the frame path, and its motifs are adopted at the "
                                              "start of frame n + k (frames, not seconds: replay reproduces it); 0: "
                                              "on the frame that falls due (~110 ms on that frame at 512 px)")
    num_threads: int | None = Field(1, ge=1, le=256, description="torch CPU threads while encoding (restored after): "
                                                                "on a busy 2-core CPU two threads make the Zernike "
                                                                "features 10-30x slower in bursts; None leaves torch's setting")
    log_symmetry: bool = Field(True, description="log the per-atom n-fold symmetry scores (rounded to 6 digits) "
                                                 "in the motifs stream")


class PipelineRVAEConfig(BaseModel):
    """``pipeline.rvae``: the rVAE stage of a run (:class:`~stemagent.encoding.rvae_stage.RVAEStage`):
    per-atom latents (angle, shift, content ``z``) from a trained rVAE, in the observation's
    per-atom features and the run log's ``latents`` stream. Off unless the section is present."""

    model_config = ConfigDict(extra="forbid")

    weights: Path | None = Field(None, description="rVAE state dict (.pt) with its .json header; None = the shipped "
                                                   "stemagent/weights/rvae_graphene.pt")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto': CUDA when available, else CPU")
    num_threads: int | None = Field(1, ge=1, le=256, description="torch CPU threads while encoding (restored after); "
                                                                "None leaves torch's setting")
    log_digits: int = Field(5, ge=1, le=9, description="latents in the run log are rounded to this many decimals")
