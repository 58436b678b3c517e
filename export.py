"""Export a trained model as a bundle (and optionally index a collection):
``python export.py ckpt_path=... out=bundle/ [index.collection=/images]``. See cbir/conf/export.yaml."""

from cbir.commands.export import main

if __name__ == "__main__":
    main()
