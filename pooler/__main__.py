"""`python -m pooler`: the same command line as the `pooler` script."""
from pooler.cli import main

raise SystemExit(main())
