"""Run the benchmarks from a checkout: ``python bench/run.py [--quick | --tiny] [--out DIR]``.

The same as ``python -m fastpbn bench``; the code lives in the installed package
(``fastpbn.bench``) so that the command also works from an installed wheel.
"""

import sys

from fastpbn.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
