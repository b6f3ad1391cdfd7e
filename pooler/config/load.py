"""Loading a config file: YAML (or pgbouncer.ini, by its suffix) -> a validated Config."""
from __future__ import annotations

import os

import yaml

from pooler.config.converters import ConfigError
from pooler.config.ini import load_ini
from pooler.config.model import Config
from pooler.config.validate import parse_config


def load_config(path: str) -> Config:
    """Read and validate a YAML config file (or a pgbouncer.ini, by its .ini suffix);
    every failure is a ConfigError naming it."""
    if path.lower().endswith(".ini"):
        return load_ini(path)        # same validator, PgBouncer's file format
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config file: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not valid UTF-8: {e.reason}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: YAML syntax error: {_yaml_problem(e)}"]) from None
    return parse_config({} if data is None else data, source_path=os.path.abspath(path))


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def check_config_file(path: str) -> list[str]:
    """[] if the file is a valid config, else every error found."""
    try:
        load_config(path)
    except ConfigError as e:
        return e.errors
    return []
