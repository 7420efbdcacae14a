"""Server settings: one field, one flag, its help text beside it."""

from __future__ import annotations


def test_every_server_setting_has_help_beside_it():
    import argparse
    import dataclasses

    from softprompt.server.config import ServerConfig, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    for f in dataclasses.fields(ServerConfig):
        assert f.metadata.get("help"), f"ServerConfig.{f.name} has no help text"
        assert f"--{f.name.replace('_', '-')}" in text
