"""``python -m cbir.serve bundle=DIR [index=DIR] [host=...] [port=...] [api_key=...]``."""

import sys

from cbir.serve.run import main

sys.exit(main(sys.argv[1:]))
