"""The pooler's version and the PgBouncer release it follows (imports nothing of the pooler)."""

__version__ = "0.1.0"

# The PgBouncer release whose admin console and settings we follow. Tools parse
# "PgBouncer X.Y.Z" out of SHOW VERSION, so the line starts with it.
PGBOUNCER_COMPAT = "1.23.1"


def version_line(build: str = "") -> str:
    """`pooler -V`, SHOW VERSION and the worker's version string: one text. `build`
    names how this process runs (the relay step's implementation), so an operator
    sees in SHOW VERSION and the version metric whether the compiled step is in use."""
    extra = f", {build}" if build else ""
    return f"PgBouncer {PGBOUNCER_COMPAT} compatible (pooler {__version__}{extra})"
