"""zoprivacy: differentially private zeroth-order fine-tuning (DP-AggZO, Bao et al. 2025)."""

from zoprivacy import accounting
from zoprivacy.accounting import PrivacyBudgetExceeded

__version__ = "0.1.0"

__all__ = ["PrivacyBudgetExceeded", "__version__", "accounting"]
