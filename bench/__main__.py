"""`python -m bench`: see bench/run.py."""
import os
import sys

from bench.run import main

if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
