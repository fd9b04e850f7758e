"""Read-only tools over the engine: the supported families table, model inspection, the demo.

They read ``core`` (and ``checkpoint`` for headers) and change nothing in it.
"""
