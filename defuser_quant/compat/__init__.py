"""Drop-in APIs of other tools, over the core: ``defuser_quant.compat.defuser`` is Defuser's.

May import ``core`` only (``tests/test_architecture.py``), never the tools it stands in for.
"""
