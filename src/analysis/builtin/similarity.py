"""The measures after the paper, registered: linear CKA (biased and debiased), the CCA family
(mean CCA, SVCCA, PWCCA) and orthogonal Procrustes. The functions are in
`convergent.analysis.measures`; here they get their keys, options and declared properties."""

from __future__ import annotations

from dataclasses import dataclass

from convergent.analysis import measures
from convergent.analysis.registry import INVARIANCES, register_measure
from convergent.errors import ConfigError, check_choice


@dataclass
class CCAOptions:
    """Options of the CCA family (config group `analysis.cca`)."""

    svcca_keep: float = 0.99  # SVCCA: variance kept by the top singular directions
    epsilon: float = 1.0e-6  # ridge, relative to the mean unit variance
    pwcca_variant: str = "morcos2018"  # morcos2018 (the paper's canonical variates) | google_svcca (google/svcca's compute_pwcca)

    def __post_init__(self) -> None:
        check_choice(self.pwcca_variant, measures.PWCCA_VARIANTS, "analysis.cca.pwcca_variant")
        if not 0 < self.svcca_keep <= 1:
            raise ConfigError(f"analysis.cca.svcca_keep={self.svcca_keep} must be in (0, 1]")
        if self.epsilon < 0:
            raise ConfigError(f"analysis.cca.epsilon={self.epsilon} must be >= 0")


_CKA = frozenset({"permutation", "orthogonal", "isotropic_scaling", "translation"})
_SIM = dict(cross_layer=True, value_range=(0.0, 1.0))

register_measure("cka/linear", measures.linear_cka, invariances=_CKA, **_SIM, description="linear CKA (Kornblith et al. 2019)")
register_measure(
    "cka/linear_debiased",
    measures.linear_cka_debiased,
    invariances=_CKA,
    cross_layer=True,
    value_range=(-1.0, 1.0),
    needs_cka_sums=True,
    description="linear CKA with the unbiased HSIC estimator (Song et al. 2012)",
)
register_measure(
    "cca/mean",
    measures.cca,
    options=lambda c: {"epsilon": c.cca.epsilon},
    invariances=INVARIANCES,
    **_SIM,
    description="mean canonical correlation (ridge-regularised)",
)
# not invertible_linear: the principal-subspace truncation depends on the variance spectrum
register_measure(
    "cca/svcca",
    measures.svcca,
    options=lambda c: {"keep": c.cca.svcca_keep, "epsilon": c.cca.epsilon},
    invariances=_CKA,
    **_SIM,
    description="SVCCA (Raghu et al. 2017): mean CCA of the top principal directions",
)
# not orthogonal: the weights are L1 sums over net a's units; not symmetric: weighted from a's side
register_measure(
    "cca/pwcca",
    measures.pwcca,
    # google/svcca's own epsilon means something else (an absolute ridge after rescaling): its default, 0
    options=lambda c: {"epsilon": c.cca.epsilon if c.cca.pwcca_variant == "morcos2018" else None, "variant": c.cca.pwcca_variant},
    invariances=frozenset({"permutation", "isotropic_scaling", "translation"}),
    symmetric=False,
    **_SIM,
    description="projection-weighted CCA (Morcos et al. 2018), weighted from a's side",
)
register_measure(
    "procrustes/similarity",
    measures.procrustes,
    invariances=_CKA,
    **_SIM,
    description="orthogonal Procrustes similarity: nuclear norm of the cross-covariance over the product of Frobenius norms",
)
