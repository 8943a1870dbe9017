"""``python -m lib.phantom``: the phantom command line (:func:`lib.phantom.main`)."""

import sys

from lib.phantom import main

if __name__ == "__main__":
    sys.exit(main())
