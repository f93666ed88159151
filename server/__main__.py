"""``python -m edgefl_server``: the same as ``edgefl server``."""
import argparse

from edgefl_server import cli

parser = argparse.ArgumentParser(prog="python -m edgefl_server", description=cli.__doc__.splitlines()[0])
cli.add_arguments(parser)
raise SystemExit(cli.run(parser.parse_args()))
