"""``python -m smoothness.correlate``: the correlation of smoothness and caching error (the command lives in ``smoothness.analysis.cli``).

Imported as a library module this path is deprecated: it gives ``smoothness.analysis.correlate`` with a
DeprecationWarning.
"""
import sys

if __name__ == "__main__":
    from smoothness.analysis.cli import main
    from smoothness.cli import run_cli
    sys.exit(run_cli(main))
else:
    from smoothness._moved import replace_with
    replace_with(__name__, "analysis.correlate")
