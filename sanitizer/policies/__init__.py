"""Selection policies behind one interface; importing this package registers all of them."""

from sanitizer.policies import (  # noqa: F401  (registration)
    activation_clustering,
    cleanlab,
    deep_knn,
    density,
    epic,
    simple,
    spectral,
)
from sanitizer.policies.base import (
    Policy,
    Selection,
    available_policies,
    make_policy,
    register_policy,
    select,
)

__all__ = ["Policy", "Selection", "available_policies", "make_policy", "register_policy", "select"]
