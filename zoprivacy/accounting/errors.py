"""Exceptions and warnings raised by the privacy accounting."""


class PrivacyBudgetExceeded(RuntimeError):
    """Raised *before* a step (or release) whose privacy cost would exceed the configured budget.

    Raised before any data is touched, so the guarantee of everything released so far still holds.
    """


class OrderRangeWarning(UserWarning):
    """The best Rényi order is at the edge of the order list: a wider list may give a smaller ε."""
