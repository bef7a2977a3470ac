"""sanitizer: defend PyTorch training runs against data poisoning.

Per-example gradient embeddings, per-class kNN density (faiss), and a sanitizer that drops the
isolated examples on a schedule while the model trains.
"""

from sanitizer.attach import SanitizedLoader, attach
from sanitizer.config import SanitizerConfig
from sanitizer.core import RoundRecord, Sanitizer
from sanitizer.embeddings import find_last_linear, gradient_embeddings
from sanitizer.policies import Policy, Selection, available_policies, make_policy, register_policy, select

__version__ = "0.1.0"
__all__ = [
    "Policy",
    "RoundRecord",
    "SanitizedLoader",
    "Sanitizer",
    "SanitizerConfig",
    "Selection",
    "attach",
    "available_policies",
    "find_last_linear",
    "gradient_embeddings",
    "make_policy",
    "register_policy",
    "select",
]
