"""LeCAM's EMAs under torch.distributed: two real gloo ranks on CPU, each with its own batches, must
end with identical EMAs, those of the mean logits averaged over the ranks (what rank 0 checkpoints
is then every rank's state)."""

from __future__ import annotations

import datetime
import socket

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
