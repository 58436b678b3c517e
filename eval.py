"""Evaluate retrieval: ``python eval.py ckpt_path=outputs/.../checkpoints/best.ckpt``. See cbir/conf/eval.yaml."""

from cbir.commands.eval import main

if __name__ == "__main__":
    main()
