"""The pictures a run leaves: the labelled reconstruction grid and the training curves."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from metrics.grid import GRID_CHUNK_GAP, GRID_PAD, label_margin, save_grid, upscale_factor
from training import curves


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return (((x + 1) / 2).clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def test_upscale_factor():
    assert [upscale_factor(s) for s in (16, 32, 48, 64, 100, 128, 256)] == [8, 4, 3, 2, 2, 1, 1]


def test_small_tiles_are_upscaled_nearest_and_pixel_exact(tmp_path):
    images, recon = _images(3, 64, 0), _images(3, 64, 1)
    grid = save_grid(images, recon, str(tmp_path / "grid.png"))
    tile = 128  # 64 px tiles doubled
    margin = label_margin(["input", "recon"], tile)
    assert grid.dtype == torch.uint8
    assert grid.shape == (3, GRID_PAD + 2 * (tile + GRID_PAD), margin + GRID_PAD + 3 * (tile + GRID_PAD))
    # The saved PNG is the returned grid.
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid.png")), grid.permute(1, 2, 0).numpy())
    # Reconstruction j sits in row 2, column j, as its nearest-neighbour upscale.
    y, x = GRID_PAD + tile + GRID_PAD, margin + GRID_PAD + 2 * (tile + GRID_PAD)
    want = _to_u8(recon[2]).repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    assert torch.equal(grid[:, y : y + tile, x : x + tile], want)
    inputs = _to_u8(images[0]).repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    assert torch.equal(grid[:, GRID_PAD : GRID_PAD + tile, margin + GRID_PAD : margin + GRID_PAD + tile], inputs)


def test_wraps_at_eight_a_row_with_labelled_rows():
    n, size = 32, 32
    images, recon = _images(n, size, 2), _images(n, size, 3)
    grid = save_grid(images, recon, None)
    tile = size * upscale_factor(size)
    assert tile == 128
    margin = label_margin(["input", "recon"], tile)
    assert margin > 0
    assert grid.shape[2] == margin + GRID_PAD + 8 * (tile + GRID_PAD)  # 8 tiles a row, not 32
    chunks = n // 8
    assert grid.shape[1] == GRID_PAD + chunks * 2 * (tile + GRID_PAD) + (chunks - 1) * GRID_CHUNK_GAP
    # Image 9 is the second input of the second chunk; its reconstruction right below it.
    y0 = GRID_PAD + 2 * (tile + GRID_PAD) + GRID_CHUNK_GAP
    x = margin + GRID_PAD + (tile + GRID_PAD)
    want = _to_u8(recon[9]).repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    assert torch.equal(grid[:, y0 + tile + GRID_PAD : y0 + 2 * tile + GRID_PAD, x : x + tile], want)
    # The labels are drawn in the margin: it is not blank in any row.
    for row in range(2 * chunks):
        y = GRID_PAD + (row // 2) * GRID_CHUNK_GAP + row * (tile + GRID_PAD)
        strip = grid[:, y : y + tile, :margin]
        assert (strip < 128).any(), f"row {row} has no label"
    # "input" and "recon" are different words: the two label strips differ.
    second = GRID_PAD + tile + GRID_PAD
    assert not torch.equal(grid[:, GRID_PAD : GRID_PAD + tile, :margin], grid[:, second : second + tile, :margin])


def test_several_models_uint8_and_custom_labels():
    ref = _to_u8(_images(2, 256, 4))
    recons = [_to_u8(_images(2, 256, 5)), _to_u8(_images(2, 256, 6))]
    grid = save_grid(ref, recons, None, labels=["reference", "model", "baseline"])
    margin = label_margin(["reference", "model", "baseline"], 256)
    assert grid.shape == (3, GRID_PAD + 3 * (256 + GRID_PAD), margin + GRID_PAD + 2 * (256 + GRID_PAD))  # no upscale
    y = GRID_PAD + 2 * (256 + GRID_PAD)
    assert torch.equal(grid[:, y : y + 256, margin + GRID_PAD : margin + GRID_PAD + 256], recons[1][0])
    with pytest.raises(ValueError, match="labels"):
        save_grid(ref, recons, None, labels=["reference", "model"])
    with pytest.raises(ValueError, match="shape"):
        save_grid(ref, ref[:1], None)


# ---------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------


def _write_log(path, with_validation: bool = True, disc_start: int = 60) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for step in range(0, 101, 5):
            gan = step >= disc_start
            record = {
                "step": step,
                "loss/total": 5000 - 20 * step + rng.uniform(0, 50),
                "loss/nll": 4000 - 20 * step,
                "loss/l1": 3000 - 15 * step,
                "loss/lpips": 0.5 - 0.003 * step,
                "loss/id": 0.1,
                "loss/kl": 1000 + 10 * step,
                "loss/gan": -0.2 if gan else 0.0,
                "loss/adaptive_weight": 35.0 if gan else 0.0,
                "loss/gan_factor": 1.0 if gan else 0.0,
                "disc/loss": 2.0 if gan else 0.0,
                "disc/logits_real": 0.3 if gan else 0.0,
                "disc/logits_fake": -0.3 if gan else 0.0,
                "lr/generator": 1e-4,
            }
            f.write(json.dumps(record) + "\n")
            if with_validation and step % 50 == 0:
                held_out = {"validation/psnr": 10 + step / 10, "validation/ssim": 0.1 + step / 500}
                held_out |= {"latent/kl_mean": 2.0, "latent/kl_min": 1e-4, "latent/dead_channels": 1.0}
                held_out |= {"latent/hf_share": 0.2, "latent/hf_share_image": 0.05}
                held_out |= {"latent/equivariance_psnr_scale": 20.0, "latent/equivariance_psnr_rot90": 25.0}
                f.write(json.dumps({"step": step, **held_out, "validation/lpips": 0.3 - step / 1000}) + "\n")
        f.write('{"step": 105, "loss/total": 12')  # a line cut short by a crash


def _gan_lines(fig):
    return [line for ax in fig.axes for line in ax.get_lines() if line.get_gid() == curves.GAN_START_GID]


def test_curves_png_with_gan_start_in_every_panel(tmp_path):
    log = tmp_path / "log.jsonl"
    _write_log(log)
    png = tmp_path / "out" / "training_curves.png"
    assert curves.plot_training_curves(str(log), str(png), gan_start=60) == str(png)
    with Image.open(png) as img:
        img.load()
        assert img.format == "PNG" and img.width >= 800 and img.height >= 600
    series = curves.read_log(str(log))
    assert series["validation/psnr"] == [(0, 10.0), (50, 15.0), (100, 20.0)] and 105 not in dict(series["loss/total"])
    fig = curves.build_figure(series, gan_start=60)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    titles = [ax.get_title() for ax in panels]
    assert len(titles) == len(curves.PANELS)
    want = {"held-out PSNR (dB)", "held-out SSIM", "held-out LPIPS", "L1", "KL", "discriminator mean logits"}
    want |= {"latent KL (nats/element), dead and inactive channels", "latent DCT share > ½ Nyquist, equivariance PSNR"}
    assert want <= set(titles)
    gan_lines = _gan_lines(fig)
    assert len(gan_lines) == len(panels)  # one per panel
    assert all(list(line.get_xdata()) == [60, 60] and line.get_linestyle() == "--" for line in gan_lines)
    by_title = dict(zip(titles, panels, strict=False))
    assert by_title["L1"].get_yscale() == "log" and by_title["GAN (generator)"].get_yscale() == "linear"
    # Without an explicit start, the first step with a positive GAN factor.
    assert curves.infer_gan_start(series) == 60


def test_curves_skip_missing_keys_and_empty_logs(tmp_path):
    log = tmp_path / "log.jsonl"
    _write_log(log, with_validation=False)
    series = curves.read_log(str(log))
    fig = curves.build_figure(series, gan_start=None)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles and not any(t.startswith("held-out") for t in titles)
    assert not _gan_lines(fig)
    assert curves.plot_training_curves(str(log), str(tmp_path / "c.png")) == str(tmp_path / "c.png")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert curves.plot_training_curves(str(empty), str(tmp_path / "e.png")) is None
    assert curves.plot_training_curves(str(tmp_path / "missing.jsonl"), str(tmp_path / "m.png")) is None
    # A term that is off logs 0 at every step (--lpips_weight 0, --id_weight 0): no panel for it.
    off = tmp_path / "off.jsonl"
    off.write_text(
        "".join(json.dumps({"step": s, "loss/l1": 1.0 / (s + 1), "loss/lpips": 0.0}) + "\n" for s in range(5))
    )
    titles = [ax.get_title() for ax in curves.build_figure(curves.read_log(str(off))).axes if ax.get_title()]
    assert titles == ["L1"]
    (tmp_path / "other.jsonl").write_text('{"step": 1, "perf/images_per_s": 3.0}\nnot json\n')
    assert curves.plot_training_curves(str(tmp_path / "other.jsonl"), str(tmp_path / "o.png")) is None
    assert not any((tmp_path / name).exists() for name in ("e.png", "m.png", "o.png"))
