"""Build a :class:`~stemagent.simulators.twin.TwinDriver` from a :class:`stemagent.config.TwinConfig`."""

from __future__ import annotations

from typing import Any

import numpy as np

from stemagent.clock import Clock
from stemagent.simulators.dynamics import BeamDynamics, ChannelClocks, CrossSections
from stemagent.simulators.adf_detector import AnnularDetector, calibrated_adf, standard_haadf
from stemagent.simulators.fast_adf import ADFModel
from stemagent.simulators.hop_rates import (
    EmpiricalSwapRate,
    PhysicalSwapRate,
    SiteVariation,
    SwapRateModel,
    sample_random_swap_rate,
)
from stemagent.simulators.optics import Aberrations, ProbeOptics
from stemagent.simulators.scan import DetectorModel, DriftModel
from stemagent.simulators.specimens import TMD_LATTICE_A, Specimen, build_specimen
from stemagent.simulators.twin import TwinDriver


def specimen_from_config(cfg: Any, rng: np.random.Generator) -> Specimen:
    size = (cfg.specimen_size_A, cfg.specimen_size_A)
    if cfg.specimen == "graphene":
        opts: dict[str, Any] = {"si_per_nm2": cfg.si_per_nm2, "vacancy_per_nm2": cfg.vacancy_per_nm2, "n_si": cfg.n_si}
        if getattr(cfg, "si_layout", "uniform") != "uniform":
            opts.update(
                si_layout=cfg.si_layout,
                si_n_clusters=cfg.si_n_clusters,
                si_clusters_per_nm2=cfg.si_clusters_per_nm2,
                si_cluster_sigma_A=cfg.si_cluster_sigma_A,
                si_background_fraction=cfg.si_background_fraction,
            )
    elif cfg.specimen in TMD_LATTICE_A:
        opts = {
            "vacancy_fraction": cfg.chalcogen_vacancy_fraction,
            "substitution_fraction": cfg.substitution_fraction,
            "substituent": cfg.substituent,
        }
    elif cfg.specimen == "srtio3":
        opts = {"n_cells": cfg.n_cells}
    elif cfg.specimen == "boundary_film":
        opts = {"n_cells": cfg.n_cells, "chain": cfg.boundary_chain.params(), "displacement_A": cfg.displacement_A,
                "tile_cells": cfg.boundary_tile_cells}
    else:
        opts = {"n_cells": cfg.n_cells, "domain_width_A": cfg.domain_width_A, "displacement_A": cfg.displacement_A}
    return build_specimen(cfg.specimen, size_A=size, center_A=(0.0, 0.0), rng=rng, **opts)


def adf_from_config(cfg: Any) -> ADFModel:
    """The ADF model of a TwinConfig: the calibrated ring (standard HAADF for the voltage, or the
    configured angles) or the older power law."""
    det = getattr(cfg, "adf_detector", "power-law")
    if det == "power-law":
        return ADFModel(z_exponent=cfg.z_exponent, sigma_C_A2=cfg.sigma_C_A2, background=cfg.background)
    ring = standard_haadf(cfg.energy_keV) if det == "standard-haadf" else AnnularDetector(float(det[0]), float(det[1]))
    return calibrated_adf(ring, cfg.energy_keV, cfg.convergence_mrad, background=cfg.background)


def optics_from_config(cfg: Any) -> ProbeOptics:
    return ProbeOptics(
        energy_keV=cfg.energy_keV,
        convergence_mrad=cfg.convergence_mrad,
        aberrations=Aberrations(C10_A=cfg.C10_A, C12_A=cfg.C12_A, phi12_rad=cfg.phi12_rad, C30_A=cfg.C30_A, C50_A=cfg.C50_A),
        source_fwhm_A=cfg.source_fwhm_A,
    )


def twin_from_config(cfg: Any, clock: Clock | None = None, seed: int = 0, specimen: Specimen | None = None) -> TwinDriver:
    """A TwinDriver for ``cfg`` (a TwinConfig); every random stream derives from ``seed``.
    ``specimen``: use this one instead of building the configured specimen (e.g. a dopant placed by hand)."""
    ss = np.random.SeedSequence(seed)
    # spawn children depend on their index only: the first four as before, old seeds keep their twins
    spec_seed, drift_seed, run_seed, rate_seed, event_seed = ss.spawn(5)
    if specimen is None:
        specimen = specimen_from_config(cfg, np.random.default_rng(spec_seed))
    drift = DriftModel(
        velocity_A_per_s=tuple(cfg.drift_velocity_A_per_s),
        wobble_amplitude_A=cfg.drift_wobble_A,
        wobble_period_s=cfg.drift_wobble_period_s,
        random_walk_A_per_sqrt_s=cfg.drift_random_walk_A_per_sqrt_s,
        seed=int(drift_seed.generate_state(1)[0]),
        origin_s=clock.monotonic() if clock is not None else 0.0,
    )
    twin = TwinDriver(
        specimen,
        clock=clock,
        rng=np.random.default_rng(run_seed),
        optics=optics_from_config(cfg),
        adf=adf_from_config(cfg),
        detector=DetectorModel(gain=cfg.detector_gain, offset=cfg.detector_offset, read_noise=cfg.read_noise,
                               efficiency=cfg.detector_efficiency),
        drift=drift,
        jitter_A=cfg.jitter_A,
        beam_current_pA=cfg.beam_current_pA,
        cross_sections=CrossSections(
            si_swap_barn=cfg.si_swap_barn,
            si_swap_ref_keV=cfg.si_swap_ref_keV,
            c_knock_on_barn=cfg.c_knock_on_barn,
            chalcogen_sputter_barn=cfg.chalcogen_sputter_barn,
            threshold_width_eV=cfg.threshold_width_eV,
        ),
        dynamics=cfg.dynamics,
        park_sample_interval_s=cfg.park_sample_interval_s,
        max_fov_A=cfg.max_fov_A,
    )
    model = swap_rate_from_config(cfg, twin.dynamics, int(rate_seed.generate_state(1)[0]))
    if model is not None:
        twin.set_swap_rate(model)
    if getattr(cfg, "common_random_numbers", False):
        twin.dynamics.event_clocks = ChannelClocks(int(event_seed.generate_state(1, np.uint64)[0]) >> 1)
    return twin


def swap_rate_from_config(cfg: Any, dynamics: BeamDynamics, seed: int) -> SwapRateModel | None:
    """The swap-rate model ``cfg.swap_rate_model`` names (None for the physical default without
    site variation); random rate functions and site factors derive from ``seed``."""
    kind = getattr(cfg, "swap_rate_model", "physical")
    site_sigma = float(getattr(cfg, "swap_site_sigma", 0.0))
    if kind == "physical" and site_sigma <= 0:
        return None
    sites = SiteVariation(site_sigma, seed)
    sigma = dynamics.cross_sections.at_energy("swap", dynamics.optics.energy_keV, 6)
    if kind == "physical":
        return PhysicalSwapRate(sigma, dynamics.probe_density, sites)
    peak = sigma * float(dynamics.probe_density(np.zeros((1, 2)))[0])
    if kind == "empirical":
        return EmpiricalSwapRate(peak, dynamics.probe_density, site_variation=sites)
    if kind == "random":
        return sample_random_swap_rate(np.random.default_rng(seed), peak, dynamics.probe_density, site_variation=sites)
    raise ValueError(f"swap_rate_model={kind!r}: must be one of 'physical', 'empirical', 'random'")
