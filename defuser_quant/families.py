"""The one place for families whose structure Transformers does not describe by itself.

Everything else is detected from the layout facts ``@use_experts_implementation`` stamps on
experts classes. Entries here must say why they exist.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .naming import ProjectionNames

# model_type -> per-expert projection names, where the conversion mapping does not tell them.
PROJECTION_NAME_OVERRIDES: dict[str, ProjectionNames] = {}
