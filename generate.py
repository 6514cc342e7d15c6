"""Placeholder until generate.py lands (issue 6): says so instead of failing obscurely."""
import sys

if __name__ == "__main__":
    sys.exit("generate.py is not built yet: the pipeline (issue 6) and the bundled demo model (issue 7) are in progress.")
