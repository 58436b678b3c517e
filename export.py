"""Export a trained model as a bundle (and optionally index a collection):
``python export.py ckpt_path=... out=bundle/ [index.collection=/images]``. See conf/export.yaml."""

from cbir.entry import run_hydra
from cbir.export.run import export

if __name__ == "__main__":
    run_hydra("export", export)
