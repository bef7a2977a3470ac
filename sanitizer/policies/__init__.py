"""Selection policies behind one interface; importing this package registers all of them."""

from sanitizer.policies import density, epic, simple  # noqa: F401  (registration)
from sanitizer.policies.base import Policy, Selection, available_policies, make_policy, register_policy, select

__all__ = ["Policy", "Selection", "available_policies", "make_policy", "register_policy", "select"]
