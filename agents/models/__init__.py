"""The fleet's state: agents, the model catalog, placements and load history.

One module per table or family of tables; Django finds the models here, in the app's
`models` package, and `agents.models.Placement` names each as before.
"""

from agents.models.agent import Agent
from agents.models.catalog import TRUSTED_CHECKPOINT, Model
from agents.models.history import LoadEstimate, LoadEvent, StepCounter
from agents.models.placement import Placement, PlacementQuerySet

__all__ = [
    "TRUSTED_CHECKPOINT",
    "Agent",
    "LoadEstimate",
    "LoadEvent",
    "Model",
    "Placement",
    "PlacementQuerySet",
    "StepCounter",
]
