"""PostgreSQL connection pooler."""
from pooler.version import __version__  # noqa: F401  (the package's version, for tools)
