"""``python -m cbir.serve bundle=DIR [index=DIR] [host=...] [port=...] [api_key=...]`` (an entry shim over
:mod:`cbir.commands.serve`)."""

import sys

from cbir.commands.serve import main

sys.exit(main(sys.argv[1:]))
