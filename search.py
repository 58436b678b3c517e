"""Find the images most similar to a query: ``python search.py bundle=bundle/ query=photo.jpg k=10``.
See conf/search.yaml (plain ``key=value`` arguments; ``--json`` also works)."""

import sys

from cbir.cli import search_main

if __name__ == "__main__":
    sys.exit(search_main(sys.argv[1:]))
