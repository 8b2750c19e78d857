"""Dataset recipes for ``cmkd prepare``: esc50, fsd50k, audioset and a generic folder + CSV.

Each recipe module reads one source layout into a :class:`Plan`; ``prepare.py`` writes any plan.
"""

from cmkd.data.recipes import audioset, esc50, folder, fsd50k  # noqa: F401 - importing registers them
from cmkd.data.recipes.base import RECIPES, Clip, Plan, Recipe, RecipeError, get_recipe, register
from cmkd.data.recipes.prepare import PrepareOptions, PrepareReport, prepare, run_plan

__all__ = ["RECIPES", "Clip", "Plan", "PrepareOptions", "PrepareReport", "Recipe", "RecipeError", "get_recipe",
           "prepare", "register", "run_plan"]
