"""Dataset readers, one module per format; each returns a :class:`cbir.data.catalog.Catalog` (or, for
explicit pairs, a :class:`PairCatalog`). A data config (``conf/data/<name>.yaml``) names its reader with a
``_target_``; :func:`catalog_from_config` builds it without Hydra, so index collections and search can
read dataset configs too."""

from __future__ import annotations

import logging
import os

from cbir.data.catalog import Catalog
from cbir.data.splits import hold_out_validation

log = logging.getLogger(__name__)


def catalog_from_config(data_cfg, validation: bool = True) -> Catalog:
    """The catalog of a data config's ``reader`` (an OmegaConf node or dict), with ``val_classes`` /
    ``val_images`` of the training split held out as split ``val`` (:mod:`cbir.data.splits`).
    Interpolations such as ``${data.root}`` or ``${seed}`` resolve against the whole config the node belongs
    to, or against the data config alone when it stands by itself."""
    from omegaconf import OmegaConf

    from cbir.configs import instantiate

    node = data_cfg if OmegaConf.is_config(data_cfg) else OmegaConf.create(data_cfg)
    if node._get_parent() is None:  # a data config on its own: readers interpolate ${data.*}
        node = OmegaConf.create({"data": node}).data
    reader = OmegaConf.to_container(node.reader, resolve=True)
    catalog = instantiate(reader)
    if validation and isinstance(catalog, Catalog):  # pair catalogs hold their own held-out split
        catalog = hold_out_validation(catalog, val_classes=_plain(node.get("val_classes")),
                                      val_images=node.get("val_images"), train_split=node.get("train_split", "train"),
                                      seed=int(node.get("val_seed", 0)))
    log.info(catalog.summary())
    return catalog


def _plain(value):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def read_data_config(name: str, spec: str | None = None, config_dir: str | os.PathLike | None = None) -> Catalog:
    """The catalog of the data config ``name`` (``emoji``, ``fashion_mnist``, ...) of ``config_dir``
    (default: the shipped configs); ``spec`` is what the user wrote, for the error message."""
    from cbir.configs import load_option
    from cbir.errors import ConfigError, DataError

    try:
        config = load_option("data", name, folder=config_dir)
    except ConfigError as exc:
        raise DataError(f"collection {spec or name}: not a folder, a .csv file or a data config "
                        f"(<name>[:split]); {exc}") from None
    return catalog_from_config(config, validation=False)  # a collection is the dataset's own splits
