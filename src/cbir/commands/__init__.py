"""All entry code: each module turns command-line arguments into a config and runs one task with the
library (``cbir <verb>``, the root ``train.py``/``eval.py``/``export.py``/``search.py`` shims and
``python -m cbir.serve`` all land here). Hydra and argument parsing live here and nowhere below; no
library package imports this one."""
