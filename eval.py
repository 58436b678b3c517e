"""Evaluate retrieval: ``python eval.py ckpt_path=outputs/.../checkpoints/best.ckpt``. See conf/eval.yaml."""

from cbir.entry import run_hydra
from cbir.evaluation.run import evaluate

if __name__ == "__main__":
    run_hydra("eval", evaluate)
