"""Training and evaluation under DDP on CPU: two gloo processes launched the way users launch them
(``python train.py trainer=ddp_cpu``), compared with one process on the same checkpoint and data.

The launches take 15-30 s each on two shared cores, hence ``slow`` (they still run in ``make test``)."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.configs import compose_config
from helpers.paths import ROOT, TESTS
from PIL import Image

from cbir.commands.eval import evaluate
from cbir.training.distributed import TrainingLoss, gathers_global_batch

TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """``python <script> args`` as a user would run it, one OpenMP thread, its own rendezvous port."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> Path:
    """6 classes x 8 images, one fewer in a held-out class: the validation half (classes 3-5) has 23
    images, odd, so the evaluation DistributedSampler pads one rank with a duplicate; the training half
    (3 x 8, no repeats) gives 2 batches of 6 per rank."""
    root = tmp_path_factory.mktemp("ddp_data")
    rng = np.random.default_rng(3)
    for c in range(6):  # noise around a faint class tint: retrieval is imperfect, so the metrics can disagree
        tint = rng.integers(-40, 40, size=3)
        for i in range(8 if c != 5 else 7):
            pixels = np.clip(rng.integers(60, 196, size=(24, 24, 3)) + tint, 0, 255).astype(np.uint8)
            (root / f"class_{c:02d}").mkdir(exist_ok=True)
            Image.fromarray(pixels).save(root / f"class_{c:02d}" / f"img_{i}.png")
    return root


def data_overrides(root: Path) -> list[str]:
    # the fixture's 3 training classes are all needed for a batch of 6 at m=2: validate on the test classes
    return ["data=folder", f"data.root={root}", "data.image_size=32", "data.batch_size=6", "data.m_per_class=2",
            "data.eval_batch_size=8", "data.num_workers=0", "model=resnet18", "model.pretrained=none", "head.dim=16",
            "data.val_classes=null", "data.val.queries=test"]


def train_ddp(root: Path, out: Path, extra: list[str], epochs: int = 1) -> dict[int, dict]:
    launch("train.py", data_overrides(root) + [
        "trainer=ddp_cpu", f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", "logger=csv",
        "+callbacks.probe._target_=helpers.ddp_probe.RankProbe", f"+callbacks.probe.out={out / 'probe'}",
        f"hydra.run.dir={out}", *extra])
    return {r: torch.load(out / "probe" / f"rank{r}.pt", weights_only=False) for r in (0, 1)}


def logged_val_metrics(run: Path) -> dict[str, float]:
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    val = [r for r in rows if r.get("val/map_at_r")]
    assert len(val) == 1
    return {k.removeprefix("val/"): float(v) for k, v in val[0].items() if k.startswith("val/") and v}


def weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained parameters of a module state. Not BatchNorm's running statistics: each rank updates
    its own from its batch, and DDP re-broadcasts rank 0's at the start of the next forward pass."""
    buffers = ("running_mean", "running_var", "num_batches_tracked", "_memory")
    return {k: v for k, v in state.items() if not k.endswith(buffers)}


def assert_same_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_ddp_training_and_validation_equal_single_process(odd_data, tmp_path):
    """Two gloo processes train a step each... and their gathered validation metrics equal one process's
    evaluation of the same checkpoint on the same (odd-sized) validation set."""
    run = tmp_path / "run"
    ranks = train_ddp(odd_data, run, ["test_after_fit=false"])

    # disjoint training batches, equal step counts, finite losses
    steps = [[tuple(b[2]) for b in ranks[r]["batches"]] for r in (0, 1)]
    assert len(steps[0]) == len(steps[1]) == 2
    seen = [i for rank in steps for batch in rank for i in batch]
    assert len(seen) == len(set(seen))
    assert all(torch.isfinite(torch.tensor(ranks[r]["losses"])).all() for r in (0, 1))
    # after the steps both replicas hold the same weights, and the weights moved
    assert_same_states(weights(ranks[0]["end_state"]), weights(ranks[1]["end_state"]))
    moved = [k for k, v in ranks[0]["start_state"].items()
             if v.is_floating_point() and not torch.equal(v, ranks[0]["end_state"][k])]
    assert moved

    # the checkpoint holds the replicas' weights, which the validation at the end of the epoch scored
    checkpoint = run / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(saved[k], ranks[0]["end_state"][k]) for k in saved if k.startswith("embedder."))

    ddp_metrics = logged_val_metrics(run)
    single = evaluate(compose_config("eval", data_overrides(odd_data) + [
        f"ckpt_path={checkpoint}", "protocol=val", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        f"paths.output_dir={tmp_path / 'eval_single'}"]))
    assert single["num_queries"] == 23  # every validation image once: the padded duplicate not counted
    assert 0.05 < single["map_at_r"] < 0.95  # not saturated: a wrong gather would show
    assert ddp_metrics.keys() == single.keys()
    for name, value in single.items():
        assert ddp_metrics[name] == pytest.approx(value, abs=TOL), name

    # eval.py under DDP (test stage) agrees too
    launch("eval.py", data_overrides(odd_data) + [
        f"ckpt_path={checkpoint}", "protocol=val", "trainer=ddp_cpu", "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'eval_ddp'}"])
    ddp_eval = json.loads((tmp_path / "eval_ddp" / "eval.json").read_text())["results"]
    (ddp_eval,) = ddp_eval.values()
    for name, value in single.items():
        assert ddp_eval[name] == pytest.approx(value, abs=TOL), name


@pytest.mark.slow
def test_ddp_cross_batch_memory_holds_every_ranks_embeddings(odd_data, tmp_path):
    """loss.xbm=true under DDP: every rank enqueues the global batch, so both memories hold the same
    embeddings, twice as many as one rank's batches."""
    ranks = train_ddp(odd_data, tmp_path / "run", ["loss=triplet", "loss.xbm=true", "loss.xbm_memory_size=48",
                                                   "test_after_fit=false", "trainer.limit_val_batches=0"])
    memories = []
    for r in (0, 1):
        state = ranks[r]["end_state"]
        memory, labels = state["loss_fn.embedding_memory"], state["loss_fn.label_memory"]
        filled = memory.abs().sum(dim=1) > 0
        steps = len(ranks[r]["batches"])
        assert int(filled.sum()) == 2 * 6 * steps  # 2 ranks x batch of 6 x steps: the global batches
        rows = torch.cat([labels[filled, None].float(), memory[filled]], dim=1)
        memories.append(rows[torch.argsort(rows[:, 1])])  # same rows; each rank enqueues its own batch first
    assert torch.allclose(memories[0], memories[1], atol=1e-6)
    assert_same_states(weights(ranks[0]["end_state"]), weights(ranks[1]["end_state"]))


@pytest.mark.slow
@pytest.mark.parametrize("loss,warmup", [("proxy_anchor", 0), ("arcface", 1)])
def test_ddp_proxies_stay_identical_across_ranks(odd_data, tmp_path, loss, warmup):
    """Proxy/classifier weights live in the LightningModule: DDP all-reduces their gradients, so after
    training steps both ranks hold the same, updated proxies. With a backbone warm-up (frozen backbone
    in epoch 0, after DDP wrapped the model) training goes on into epoch 1."""
    ranks = train_ddp(odd_data, tmp_path / "run", [f"loss={loss}", "test_after_fit=false",
                                                   "trainer.limit_val_batches=0", f"train.warmup_epochs={warmup}"],
                      epochs=1 + warmup)
    assert {epoch for epoch, _, _ in ranks[0]["batches"]} == set(range(1 + warmup))
    proxies = [k for k in ranks[0]["end_state"] if k.startswith("loss_fn.")]
    assert proxies
    for key in proxies:
        assert torch.equal(ranks[0]["end_state"][key], ranks[1]["end_state"][key]), key
        assert not torch.equal(ranks[0]["start_state"][key], ranks[0]["end_state"][key]), key
    assert_same_states(weights(ranks[0]["end_state"]), weights(ranks[1]["end_state"]))


# -- the global-batch loss, without Lightning --------------------------------------------------------


def _triplet_loss_and_miner():
    from pytorch_metric_learning import losses, miners

    return losses.TripletMarginLoss(margin=0.2), miners.TripletMarginMiner(margin=0.2, type_of_triplets="all")


def _rank_gradient(rank: int, world: int, port: int, embeddings: torch.Tensor, labels: torch.Tensor, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        share = len(labels) // world
        local = embeddings[rank * share:(rank + 1) * share].clone().requires_grad_(True)
        step_loss = TrainingLoss(*_triplet_loss_and_miner(), world=world)
        loss, value = step_loss(local, labels[rank * share:(rank + 1) * share])
        loss.backward()
        grads = [torch.zeros_like(local.grad) for _ in range(world)]
        dist.all_gather(grads, local.grad / world)  # what DDP's gradient averaging does to the weights
        # rank 1 dropped two images (data.on_bad_image=skip): no gather of unequal batches, each rank's own loss
        end = (rank + 1) * share - 2 * rank
        _, uneven = step_loss(embeddings[rank * share:end], labels[rank * share:end])
        if rank == 0:
            torch.save((float(value), torch.cat(grads), float(uneven)), out)
    finally:
        dist.destroy_process_group()


def test_global_batch_loss_matches_one_process_on_the_whole_batch(tmp_path):
    """Under 2 processes the triplet loss is mined and scored over both ranks' batches: the logged value
    and the averaged gradient equal one process's on the concatenated batch (a local-only loss would
    differ: it never pairs images of different ranks)."""
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0, 3, 3, 1, 1])
    embeddings = torch.nn.functional.normalize(torch.randn(len(labels), 8), dim=1)
    context = mp.get_context("spawn")
    out = tmp_path / "rank0.pt"
    port = free_port()
    processes = [context.Process(target=_rank_gradient, args=(r, 2, port, embeddings, labels, out)) for r in (0, 1)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=120)
        assert p.exitcode == 0
    value, grad, uneven = torch.load(out)

    whole = embeddings.clone().requires_grad_(True)
    loss, expected_value = TrainingLoss(*_triplet_loss_and_miner())(whole, labels)
    loss.backward()
    assert value == pytest.approx(float(expected_value), rel=1e-5)
    assert torch.allclose(grad, whole.grad, atol=1e-6)

    local = embeddings[:6].clone().requires_grad_(True)
    _, local_value = TrainingLoss(*_triplet_loss_and_miner())(local, labels[:6])
    assert float(local_value) != pytest.approx(float(expected_value), rel=1e-3)
    assert uneven == pytest.approx(float(local_value), rel=1e-6)


def test_which_losses_gather_the_global_batch():
    from pytorch_metric_learning import losses

    assert gathers_global_batch(losses.TripletMarginLoss())
    assert gathers_global_batch(losses.CrossBatchMemory(losses.ContrastiveLoss(), embedding_size=4))
    assert not gathers_global_batch(losses.ProxyAnchorLoss(num_classes=3, embedding_size=4))
    assert not gathers_global_batch(losses.ArcFaceLoss(num_classes=3, embedding_size=4))
