"""``python -m smoothness.train``: train the bundled models (the command lives in ``smoothness.data.train``).

Imported as a library module this path is deprecated: it gives ``smoothness.data.train`` with a
DeprecationWarning.
"""
import sys

if __name__ == "__main__":
    from smoothness.data.train import main
    from smoothness.cli import run_cli
    sys.exit(run_cli(main))
else:
    from smoothness._moved import replace_with
    replace_with(__name__, "data.train")
