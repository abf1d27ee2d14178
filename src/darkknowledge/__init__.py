"""darkknowledge: knowledge distillation — train a small student on what a teacher knows."""

from . import data, losses, models, store, teachers
from .api import DistillResult, Report, distill
from .config import Recipe
from .errors import DKError
from .export import load_model, save_model
from .pipeline import RunResult, run_recipe
from .recipe_io import load_recipe, validate_recipe
from .signals import Signals
from .train import fit

__version__ = "0.1.0"

__all__ = [
    "DKError",
    "DistillResult",
    "Recipe",
    "Report",
    "RunResult",
    "Signals",
    "data",
    "distill",
    "fit",
    "load_model",
    "load_recipe",
    "losses",
    "models",
    "run_recipe",
    "save_model",
    "store",
    "teachers",
    "validate_recipe",
]
