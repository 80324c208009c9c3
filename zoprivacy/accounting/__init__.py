"""Privacy accounting for DP-AggZO (paper Lemma 5; appendix Lemmas 6-8).

The guarantee of a run is the RDP composition of one Laplace release of the dataset size and T
Poisson-subsampled Gaussian releases of the K-vector S, converted to (ε, δ) with Lemma 8 and
minimised over the Rényi orders. ``accountant="pld"`` gives a tighter numerical bound through
Google's ``dp-accounting`` (optional).

The exact privacy profiles (:mod:`~zoprivacy.accounting.profile`), trade-off curves
(:mod:`~zoprivacy.accounting.tradeoff`) and test-rate bounds
(:mod:`~zoprivacy.accounting.hypothesis_test`) are the tight references of the canary audit.
"""

from zoprivacy.accounting.accountant import RDPAccountant
from zoprivacy.accounting.calibration import PrivacyPlan, calibrate, get_noise_multiplier
from zoprivacy.accounting.conversion import rdp_to_dp
from zoprivacy.accounting.epsilon import compute_epsilon, epsilon_and_order
from zoprivacy.accounting.errors import OrderRangeWarning, PrivacyBudgetExceeded
from zoprivacy.accounting.hypothesis_test import clopper_pearson, epsilon_from_rates
from zoprivacy.accounting.orders import DEFAULT_ORDERS
from zoprivacy.accounting.pld import subsampled_gaussian_epsilon_pld
from zoprivacy.accounting.profile import (
    gaussian_delta,
    gaussian_epsilon,
    subsampled_gaussian_delta,
    subsampled_gaussian_deltas,
    subsampled_gaussian_epsilon,
)
from zoprivacy.accounting.rdp import rdp_laplace, rdp_subsampled_gaussian
from zoprivacy.accounting.tradeoff import mu_from_rates, subsampled_gaussian_tradeoff

__all__ = [
    "DEFAULT_ORDERS",
    "OrderRangeWarning",
    "PrivacyBudgetExceeded",
    "PrivacyPlan",
    "RDPAccountant",
    "calibrate",
    "clopper_pearson",
    "compute_epsilon",
    "epsilon_and_order",
    "epsilon_from_rates",
    "gaussian_delta",
    "gaussian_epsilon",
    "get_noise_multiplier",
    "mu_from_rates",
    "rdp_laplace",
    "rdp_subsampled_gaussian",
    "rdp_to_dp",
    "subsampled_gaussian_delta",
    "subsampled_gaussian_deltas",
    "subsampled_gaussian_epsilon",
    "subsampled_gaussian_epsilon_pld",
    "subsampled_gaussian_tradeoff",
]
