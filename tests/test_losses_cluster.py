"""What the ranks of a job must share, on two real gloo ranks on CPU.

- LeCAM's EMAs: each rank with its own batches must end with identical EMAs, those of the mean logits
  averaged over the ranks (what rank 0 checkpoints is then every rank's state);
- the start of a job on several nodes (each rank plays a node of its own): the sources are listed once,
  on rank 0, the held-out batch is drawn there and broadcast, a node that does not see the listed files
  stops every rank in one line, and so do ranks that loaded different perception weights.
"""

from __future__ import annotations

import copy
import datetime
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from losses import LeCamEMA, TransfusionLoss, lecam_reg

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
DECAY = 0.9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batches(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, fake) of one rank at one step: different on every rank, as a sharded loader gives them."""
    gen = torch.Generator().manual_seed(100 * rank + step)
    return torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1, torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1


def make_loss(lecam_weight: float) -> TransfusionLoss:
    torch.manual_seed(0)  # the same D on every rank, as DDP keeps it
    disc = nn.Conv2d(3, 1, 4, stride=2, padding=1)
    return TransfusionLoss(
        lpips_weight=0, id_weight=0, disc_start=0, lecam_weight=lecam_weight, lecam_decay=DECAY, discriminator=disc
    )


def count_all_reduces(monkeypatch=None) -> list[int]:
    """Record the size of every dist.all_reduce call from here on."""
    sizes, original = [], dist.all_reduce

    def counted(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    if monkeypatch is None:
        dist.all_reduce = counted  # a spawned worker: its own process, nothing to restore
    else:
        monkeypatch.setattr(dist, "all_reduce", counted)
    return sizes


def rank_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        all_reduces = count_all_reduces()
        loss_fn = make_loss(lecam_weight=0.1)
        local = []
        for step in range(STEPS):
            x, xr = batches(rank, step)
            loss, logs = loss_fn.discriminator_loss(x, xr, step)
            loss.backward()
            local.append(torch.stack([logs["logits_real"], logs["logits_fake"]]))
        # The regulariser pulls this rank's logits towards the shared EMAs.
        with torch.no_grad():
            expected_reg = lecam_reg(loss_fn.discriminator(x), loss_fn.discriminator(xr), *loss_fn.lecam.values())
        torch.testing.assert_close(logs["lecam"], expected_reg)
        with_lecam = list(all_reduces)
        make_loss(lecam_weight=0.0).discriminator_loss(x, xr, 0)
        torch.save(
            {
                "local_means": torch.stack(local),
                "lecam": loss_fn.lecam.state_dict(),
                "all_reduces_with_lecam": with_lecam,
                "all_reduces_without": all_reduces[len(with_lecam) :],
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_lecam_emas_agree_across_two_ranks(tmp_path):
    mp.spawn(rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [r["all_reduces_with_lecam"] for r in ranks] == [[2] * STEPS] * 2  # one 2-number all-reduce a call
    assert [r["all_reduces_without"] for r in ranks] == [[], []]  # none when LeCAM is off
    local_0, local_1 = ranks[0]["local_means"], ranks[1]["local_means"]
    assert not torch.allclose(local_0, local_1)  # the ranks did see different logits (logs stay per rank)
    for name, value in ranks[0]["lecam"].items():
        assert torch.equal(ranks[1]["lecam"][name], value), name
    by_hand = LeCamEMA(DECAY)
    for real_mean, fake_mean in (local_0 + local_1) / 2:
        by_hand.update(real_mean, fake_mean)
    for name, value in by_hand.state_dict().items():
        torch.testing.assert_close(ranks[0]["lecam"][name], value, msg=name)


def test_lecam_without_a_process_group_makes_no_collective(monkeypatch):
    assert not (dist.is_available() and dist.is_initialized())
    all_reduces = count_all_reduces(monkeypatch)
    loss_fn = make_loss(lecam_weight=0.1)
    x, xr = batches(0, 0)
    loss_fn.discriminator_loss(x, xr, 0)
    assert all_reduces == []
    assert loss_fn.lecam.steps.item() == 1


# ---------------------------------------------------------------------------------------------
# Start-up on several nodes: one listing, one held-out sample, one set of perception weights
# ---------------------------------------------------------------------------------------------


def write_vgg16_features(torch_home) -> None:
    """A torchvision-style VGG16 file (random weights, `features.*` only: all LPIPS reads) in the torch hub
    cache of TORCH_HOME=`torch_home`."""
    import torchvision

    from losses.perceptual import VGG16_URL

    torch.manual_seed(1)
    trunk = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    folder = os.path.join(torch_home, "hub", "checkpoints")
    os.makedirs(folder)
    trunk_state = {f"features.{k}": v for k, v in trunk.state_dict().items()}
    torch.save(trunk_state, os.path.join(folder, os.path.basename(VGG16_URL)))


def call_counter(module, name: str, counts: dict) -> None:
    """Count the calls of `module.name` from here on (a spawned worker: nothing to restore)."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def node_worker(rank: int, port: int, tmp: str, folder: str) -> None:
    """Rank `rank` of 2, each on a node of its own (LOCAL_RANK 0, its own torch hub cache)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    import data
    import data.resolve
    import train_vae
    from common.errors import UserError
    from tiny import tiny_config

    for state in (AcceleratorState, GradientState, PartialState):  # forked: none of the parent's state
        state._reset_state()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", OMP_NUM_THREADS="1", TORCH_HOME=f"{tmp}/hub{rank}")
    torch.hub.set_dir(f"{tmp}/hub{rank}/hub")  # what TORCH_HOME gives, unless the parent (another test) set a dir
    accelerator = Accelerator(cpu=True)
    counts, out = {}, {}
    call_counter(data.resolve, "list_images", counts)  # the os.walk of a folder source
    call_counter(data, "sample_images", counts)
    cfg = tiny_config(Path(tmp), source=[folder], num_validation_images=2, perception_weights="auto")
    plan = train_vae.list_data(cfg, accelerator)
    out["heldout"] = train_vae.draw_held_out(cfg, accelerator, plan.heldout_resolved)
    _, loader = train_vae.build_dataloader(cfg, accelerator, plan.resolved)
    out["keys"] = next(iter(loader))["key"]
    out["counts"] = dict(counts)
    for case in ("weights", "unseen"):
        try:
            if case == "weights":  # rank 0's node has the VGG16 file, rank 1's not: 'auto' gives it random ones
                train_vae.build_loss_on_every_node(cfg, accelerator)
            else:  # a relative path: rank 0's node holds the folder there, rank 1's nothing
                os.chdir(os.path.join(tmp, f"node{rank}"))
                train_vae.list_data(tiny_config(Path(tmp), source=["images"]), accelerator)
            out[case] = None
        except UserError as e:
            out[case] = f"{type(e).__name__}: {e}"
    torch.save(out, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_a_job_lists_once_draws_one_held_out_batch_and_agrees_on_its_weights(tmp_path, image_folder):
    write_vgg16_features(tmp_path / "hub0")
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    shutil.copytree(image_folder, tmp_path / "node0" / "images")
    import train_vae  # noqa: F401 - imported once here: forked ranks start with it (seconds of imports less)

    args = (free_port(), str(tmp_path), image_folder)
    mp.start_processes(node_worker, args=args, nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    # The one folder (training and held-out) walked once in the job, the held-out sample drawn once.
    assert [r["counts"] for r in ranks] == [{"list_images": 1, "sample_images": 1}, {}]
    assert ranks[0]["heldout"].shape == (2, 3, 32, 32) and torch.equal(ranks[0]["heldout"], ranks[1]["heldout"])
    assert ranks[0]["keys"] and not set(ranks[0]["keys"]) & set(ranks[1]["keys"])  # rank 0's listing, split
    for case, expected in (
        ("weights", "PerceptionWeightsError: the ranks loaded different perception weights (rank(s) 0: LPIPS "),
        ("unseen", "DataError: rank(s) 1 do not see files rank 0 listed (rank 1: 8 missing, e.g. "),
    ):
        assert ranks[0][case] == ranks[1][case], case  # every rank stops, with the same line
        assert ranks[0][case].startswith(expected) and "\n" not in ranks[0][case], ranks[0][case]
    assert "rank(s) 0: LPIPS pretrained " in ranks[0]["weights"] and "rank(s) 1: LPIPS random " in ranks[0]["weights"]


def eval_node_worker(rank: int, port: int, tmp: str) -> None:
    """eval_vae's LPIPS on rank `rank` of 2, each rank a node with its own torch hub cache."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    import eval_vae
    from common.errors import UserError
    from evaluation.config import EvalConfig

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", OMP_NUM_THREADS="1", TORCH_HOME=f"{tmp}/hub{rank}")
    torch.hub.set_dir(f"{tmp}/hub{rank}/hub")
    accelerator = Accelerator(cpu=True)
    out = {}
    for weights in ("random", "pretrained"):
        try:
            lpips = eval_vae.build_lpips_on_every_node(EvalConfig(perception_weights=weights), accelerator)
            out[weights] = lpips.net.net.slice1[0].weight.detach().clone()
        except UserError as e:
            out[weights] = f"{type(e).__name__}: {e}"
    torch.save(out, f"{tmp}/eval_rank{rank}.pt")
    dist.destroy_process_group()


def test_eval_ranks_build_one_lpips_or_all_stop_in_one_line(tmp_path):
    """eval_vae on two nodes: under 'random' every rank builds the same network; under 'pretrained', with the
    VGG16 file on rank 0's node only, both ranks stop with the same line naming rank 1, instead of rank 1
    exiting alone and rank 0 waiting in its first gather."""
    write_vgg16_features(tmp_path / "hub0")
    import eval_vae  # noqa: F401 - imported once here: forked ranks start with it

    mp.start_processes(eval_node_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"eval_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert torch.equal(ranks[0]["random"], ranks[1]["random"])
    expected = "PerceptionWeightsError: rank(s) 1 could not load the perception weights (rank 1: vgg16-397923af.pth "
    assert ranks[0]["pretrained"] == ranks[1]["pretrained"], ranks
    assert ranks[0]["pretrained"].startswith(expected) and "\n" not in ranks[0]["pretrained"]


def test_ranks_that_loaded_other_weights_or_none_stop_in_one_line():
    from common.errors import PerceptionWeightsError
    from losses.weights import check_same_weights, weights_digest, weights_fingerprint

    torch.manual_seed(0)
    vgg, moco = nn.Linear(3, 2), nn.Linear(2, 2)
    same = weights_fingerprint({"LPIPS": vgg, "MoCo": moco, "DINOv2": None}, "pretrained")
    assert set(same) == {"LPIPS", "MoCo"}
    check_same_weights([same] * 4)  # all alike: nothing to say
    changed = copy.deepcopy(vgg)
    assert weights_digest(changed) == weights_digest(vgg)
    with torch.no_grad():
        changed.bias[1] += 1e-6  # one weight: another file
    assert weights_digest(changed) != weights_digest(vgg)
    assert weights_digest(copy.deepcopy(vgg).double()) != weights_digest(vgg)  # the dtype counts
    other = weights_fingerprint({"LPIPS": changed, "MoCo": moco}, "pretrained")
    random = weights_fingerprint({"LPIPS": vgg, "MoCo": moco}, "random")
    cases = [
        ([same, same, other, other, same], "rank(s) 0-1, 4: LPIPS pretrained", "rank(s) 2-3: LPIPS pretrained"),
        ([same, random], "rank(s) 0: LPIPS pretrained", "rank(s) 1: LPIPS random"),
        ([same, "vgg16-397923af.pth is not in /x", same, "y"], "rank(s) 1, 3 could not load", "(rank 1: vgg16"),
    ]
    for gathered, *parts in cases:
        with pytest.raises(PerceptionWeightsError) as info:
            check_same_weights(gathered)
        message = str(info.value)
        assert all(part in message for part in parts) and "\n" not in message, message
