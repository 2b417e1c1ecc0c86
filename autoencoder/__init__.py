"""The model: diffusers' AutoencoderKL presets, building / loading / `--init_from` surgery, latent statistics."""
