"""`pooler convert-ini`: write the YAML equivalent of a pgbouncer.ini (validated)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import yaml

from pooler.config.converters import ConfigError
from pooler.config.ini import convert, translate
from pooler.config.validate import parse_config
from pooler.wire.tls import TLS_FILE_KEYS


def to_yaml_data(path: str) -> tuple[dict[str, Any], list[str]]:
    """The YAML equivalent of a pgbouncer.ini (validated), and its warnings."""
    conv = convert(path)
    load_errors: list[str] = list(conv.errors)
    try:
        parse_config(conv.data, source_path=os.path.abspath(path))
    except ConfigError as e:
        load_errors += [translate(err, conv.origins) for err in e.errors]
    if load_errors:
        raise ConfigError(load_errors)
    data = dict(conv.data)
    auth = data.get("auth")
    if auth and auth.get("file"):
        # Relative auth_file means "next to the ini"; keep meaning it wherever the YAML goes.
        base = os.path.dirname(os.path.abspath(path))
        data["auth"] = {**auth, "file": os.path.normpath(os.path.join(base, auth["file"]))}
    for key in TLS_FILE_KEYS:
        if data.get(key):                                 # the same for the TLS files
            base = os.path.dirname(os.path.abspath(path))
            data[key] = os.path.normpath(os.path.join(base, data[key]))
    return data, conv.warnings


def main(argv: list[str] | None = None) -> int:
    """`pooler convert-ini FILE.ini [-o OUT.yaml]`: write the equivalent YAML config."""
    p = argparse.ArgumentParser(prog="pooler convert-ini",
                                description="Convert a pgbouncer.ini into the pooler's YAML config.")
    p.add_argument("ini", help="pgbouncer.ini to convert")
    p.add_argument("-o", "--output", help="YAML file to write (default: standard output)")
    args = p.parse_args(argv)
    try:
        data, warnings = to_yaml_data(args.ini)
    except ConfigError as e:
        for err in e.errors:
            print(err, file=sys.stderr)
        print(f"{args.ini}: {len(e.errors)} error(s)", file=sys.stderr)
        return 1
    for w in warnings:
        print(f"WARNING {w}", file=sys.stderr)
    text = f"# converted from {os.path.abspath(args.ini)} by pooler convert-ini\n" + \
        yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"{args.output}: written", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
