"""The configuration layer: one table of settings, validation, the YAML and pgbouncer.ini readers, SET."""
