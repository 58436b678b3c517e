"""Find the images most similar to a query: ``python search.py bundle=bundle/ query=photo.jpg k=10``.
See cbir/conf/search.yaml (``key=value`` arguments; ``--json`` also works)."""

import sys

from cbir.commands.search import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
