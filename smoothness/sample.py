"""``python -m smoothness.sample``: sample grids of the bundled or any checkpoint (the command lives in ``smoothness.data.sample``).

Imported as a library module this path is deprecated: it gives ``smoothness.data.sample`` with a
DeprecationWarning.
"""
import sys

if __name__ == "__main__":
    from smoothness.data.sample import main
    from smoothness.cli import run_cli
    sys.exit(run_cli(main))
else:
    from smoothness._moved import replace_with
    replace_with(__name__, "data.sample")
