"""Options that used to be accepted and then fail every request, or end in a traceback (issue 15: D7, D12,
D13, D18, D19, D21): each is refused up front with one line naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.vectors import clustered

from cbir.commands import index as index_command
from cbir.commands.search import grid_paths, search_config
from cbir.commands.serve import serve_config
from cbir.data.images import decode_image
from cbir.errors import BadImageError, ConfigError
from cbir.index.builder import IndexOptions
from cbir.index.store import CbirIndex, load_index


@pytest.mark.parametrize(("option", "message"), [
    ("k=0", "k=0: must lie in 1..1000"), ("k=5000", "k=5000: must lie in 1..1000"),
    ("max_pixels=0", "max_pixels=0: must lie in 1.."), ("port=99999", "port=99999: must lie in 1..65535"),
    ("port=abc", "port='abc': must be a whole number"), ("api_key=clé", "printable ASCII"),
])
def test_serve_refuses_options_no_request_could_work_with(option, message):
    with pytest.raises(ConfigError, match=message):
        serve_config(["bundle=somewhere", option])


def test_serve_takes_a_plain_api_key_and_the_environment_one(monkeypatch):
    assert serve_config(["bundle=b", "api_key=s3cret-Key_1"]).api_key == "s3cret-Key_1"
    monkeypatch.setenv("CBIR_API_KEY", "naïve")
    with pytest.raises(ConfigError, match="printable ASCII"):
        serve_config(["bundle=b"])


@pytest.mark.parametrize("option", ["k=abc", "k=0", "batch_size=-1", "k=1.5"])
def test_search_refuses_a_k_that_is_not_a_count(option):
    with pytest.raises(ConfigError, match="must be a whole number >= 1"):
        search_config(["bundle=b", "query=q.jpg", option])


def test_result_grids_of_queries_that_share_a_file_name_do_not_overwrite_each_other(tmp_path):
    queries = [Path("a/shoe.jpg"), Path("b/shoe.jpg"), Path("c/shoe.png"), "fashion_mnist:test/3"]
    targets = grid_paths(str(tmp_path / "grids"), queries)
    assert len(set(targets.values())) == 4
    assert targets["a/shoe.jpg"].name == "shoe.png" and targets["b/shoe.jpg"].name == "shoe-2.png"
    assert targets["fashion_mnist:test/3"].name == "fashion_mnist_test_3.png"
    assert grid_paths(str(tmp_path / "one.png"), [Path("x.jpg")]) == {"x.jpg": tmp_path / "one.png"}


def test_unreadable_query_file_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(BadImageError, match="is a folder, not an image file"):
        decode_image(tmp_path, what="query")
    image = tmp_path / "x.jpg"
    image.write_bytes(b"\xff\xd8 some bytes")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", denied)  # root reads anything: simulate a file it may not read
    with pytest.raises(BadImageError, match=r"query .*x.jpg: cannot read file \(Permission denied\)"):
        decode_image(image, what="query")


def test_index_remove_with_an_unknown_id_or_path_removes_nothing_and_says_so(tmp_path, capsys):
    vectors = clustered(60)
    built = CbirIndex.build(vectors, [f"img/{i}.png" for i in range(60)], [f"c{i % 3}" for i in range(60)],
                            options=IndexOptions(kind="flat"))
    built.save(tmp_path / "index")
    with pytest.raises(SystemExit) as stop:
        index_command.main(["remove", f"index={tmp_path / 'index'}", "id=[3,999]"])
    assert stop.value.code != 0
    assert "999" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        index_command.main(["remove", f"index={tmp_path / 'index'}", "path=img/nope.png"])
    assert len(load_index(tmp_path / "index")) == 60  # nothing removed
    assert index_command.main(["remove", f"index={tmp_path / 'index'}", "id=[3]", "path=img/4.png"]) == 0
    assert len(load_index(tmp_path / "index")) == 58


def test_a_damaged_checkpoint_to_resume_is_one_line(tmp_path):
    from omegaconf import OmegaConf

    from cbir.commands.train import _resume_path
    from cbir.errors import CheckpointError

    damaged = tmp_path / "last.ckpt"
    damaged.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*last.ckpt"):
        _resume_path(OmegaConf.create({"ckpt_path": str(damaged)}))
    import torch

    torch.save({"weights": 1}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="is not a training checkpoint"):
        _resume_path(OmegaConf.create({"ckpt_path": str(tmp_path / "other.ckpt")}))


def test_export_never_deletes_what_is_not_a_bundle(tmp_path):
    from cbir.export.bundle import BundleError, check_bundle_target

    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(BundleError, match="is a file, not a folder"):
        check_bundle_target(a_file, overwrite=True)
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(BundleError, match="holds no manifest.json"):
        check_bundle_target(mine, overwrite=True)
    with pytest.raises(BundleError, match="not empty"):
        check_bundle_target(mine, overwrite=False)
    assert (mine / "holiday.jpg").read_bytes() == b"precious"
    (mine / "manifest.json").write_text("{}")
    check_bundle_target(mine, overwrite=True)  # a bundle folder may be replaced
    check_bundle_target(tmp_path / "new", overwrite=False)


def test_a_named_fashion_mnist_folder_is_not_swapped_for_another_copy(tmp_path, monkeypatch):
    from cbir.data.readers import fashion_mnist
    from cbir.errors import DataError

    monkeypatch.setattr(fashion_mnist, "host_reachable", lambda *a, **k: False)
    with pytest.raises(DataError, match=f"looked in {tmp_path / 'nonexistent'}\\)"):
        fashion_mnist.read_fashion_mnist(tmp_path / "nonexistent")


def test_resuming_last_with_nothing_to_resume_is_an_error(tmp_path):
    from omegaconf import OmegaConf

    from cbir.commands.train import _resume_path
    from cbir.errors import CheckpointError

    cfg = OmegaConf.create({"ckpt_path": "last", "paths": {"ckpt_dir": str(tmp_path / "checkpoints")}})
    with pytest.raises(CheckpointError, match="ckpt_path=last: this run folder has no"):
        _resume_path(cfg)


@pytest.mark.parametrize("value", ["abc", "-1", "true"])
def test_a_learning_rate_that_is_not_a_number_is_one_line(value):
    from helpers.configs import compose_config

    from cbir.training.factory import optimizer_factory

    cfg = compose_config("train", [f"optimizer.lr={value}"])
    with pytest.raises(ConfigError, match="optimizer.lr=.*must be a number >= 0"):
        optimizer_factory(cfg.optimizer)


def test_export_of_an_untrained_model_composes_without_a_data_config():
    from helpers.configs import compose_config
    from omegaconf import OmegaConf

    cfg = compose_config("export", ["model=mobilenet_v2", "out=bundle"])
    assert OmegaConf.to_container(cfg.model, resolve=True)["image_size"] == 224
    assert compose_config("export", ["model=mobilenet_v2", "out=b", "data.image_size=64"]).model.image_size == 64
