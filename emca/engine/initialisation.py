"""Transitional (issue 24): model.init_from is emca.models.initialisation's now; this name stays only
until the engine split (emca/engine/tasks) imports it from there, then this module goes."""

from emca.models.initialisation import Initialisation, initialise_from  # noqa: F401
