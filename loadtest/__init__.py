"""Load tests and benchmarks of the pooler.

    python -m loadtest.bench        pgbench: pooler vs PgBouncer vs direct PostgreSQL
    python -m loadtest.run_locust   locust scenarios through a pooler, with a money invariant

See loadtest/README.md.
"""
