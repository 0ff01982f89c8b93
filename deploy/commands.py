"""Deployment commands: ``d3 keys`` (see deploy/keys.py)."""
from __future__ import annotations


def add_commands(subparsers) -> None:
    from deploy.keys import add_keys_command

    add_keys_command(subparsers)
