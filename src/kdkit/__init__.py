"""kdkit: knowledge distillation for PyTorch."""

from kdkit import functional, losses
from kdkit.cache import SeededViews, TeacherCache
from kdkit.capture import FeatureCapture, list_modules, map_layers, pair_layers
from kdkit.distiller import Distiller
from kdkit.term import DistillerOutput, Term

__all__ = [
    "Distiller",
    "DistillerOutput",
    "FeatureCapture",
    "SeededViews",
    "TeacherCache",
    "Term",
    "functional",
    "list_modules",
    "losses",
    "map_layers",
    "pair_layers",
]
__version__ = "0.1.0"
