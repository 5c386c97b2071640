"""Pure analyses on statistics: no Lightning, W&B or Hydra imports.

Every function takes torch tensors (numpy arrays too, for the matrix functions) or
`convergent.stats.MomentStats`, and returns numbers, tensors/arrays or small result objects,
never plots. See README "Using members and analyses from your own code" and "Adding a measure (one file)".
"""

from convergent.analysis.calibration import Calibrated, calibrate, jackknife_interval
from convergent.analysis.clustering import (
    combined_corr,
    hierarchical_merges,
    spectral_clusters,
    spectral_clusters_from_corr,
    spectral_summary,
)
from convergent.analysis.matching import max_match, permute_to_matching, same_pair_fraction, semi_match, within_max
from convergent.analysis.measures import (
    SampleSizeWarning,
    canonical_correlations,
    cca,
    linear_cka,
    linear_cka_debiased,
    procrustes,
    procrustes_distance,
    pwcca,
    stats_from_arrays,
    svcca,
)
from convergent.analysis.mutual_info import mi_semi_match, mutual_information, mutual_information_from_arrays
from convergent.analysis.registry import REGISTRY, Analysis, Measure, Needs, Output, Result, register_analysis, register_measure
from convergent.analysis.sparse import SparsePrediction, sparse_prediction

__all__ = [
    "REGISTRY",
    "Analysis",
    "Calibrated",
    "Measure",
    "Needs",
    "Output",
    "Result",
    "calibrate",
    "jackknife_interval",
    "register_analysis",
    "register_measure",
    "SampleSizeWarning",
    "SparsePrediction",
    "canonical_correlations",
    "cca",
    "combined_corr",
    "hierarchical_merges",
    "linear_cka",
    "linear_cka_debiased",
    "max_match",
    "mi_semi_match",
    "mutual_information",
    "mutual_information_from_arrays",
    "permute_to_matching",
    "procrustes",
    "procrustes_distance",
    "pwcca",
    "same_pair_fraction",
    "semi_match",
    "sparse_prediction",
    "spectral_clusters",
    "spectral_clusters_from_corr",
    "spectral_summary",
    "stats_from_arrays",
    "svcca",
    "within_max",
]
