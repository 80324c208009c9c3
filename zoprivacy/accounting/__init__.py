"""Privacy accounting for DP-AggZO (paper Lemma 5; appendix Lemmas 6-8).

The guarantee of a run is the RDP composition of one Laplace release of the dataset size and T
Poisson-subsampled Gaussian releases of the K-vector S, converted to (ε, δ) with Lemma 8 and
minimised over the Rényi orders. ``accountant="pld"`` gives a tighter numerical bound through
Google's ``dp-accounting`` (optional).
"""

from zoprivacy.accounting.accountant import RDPAccountant
from zoprivacy.accounting.calibration import PrivacyPlan, calibrate, get_noise_multiplier
from zoprivacy.accounting.conversion import rdp_to_dp
from zoprivacy.accounting.epsilon import compute_epsilon, epsilon_and_order
from zoprivacy.accounting.errors import OrderRangeWarning, PrivacyBudgetExceeded
from zoprivacy.accounting.orders import DEFAULT_ORDERS
from zoprivacy.accounting.rdp import rdp_laplace, rdp_subsampled_gaussian

__all__ = [
    "DEFAULT_ORDERS",
    "OrderRangeWarning",
    "PrivacyBudgetExceeded",
    "PrivacyPlan",
    "RDPAccountant",
    "calibrate",
    "compute_epsilon",
    "epsilon_and_order",
    "get_noise_multiplier",
    "rdp_laplace",
    "rdp_subsampled_gaussian",
    "rdp_to_dp",
]
