"""The compiler's passes. Each module holds one pass: a class with ``name`` and ``run(state)``."""
