"""
Latent diffusion (Rombach et al. 2022): the diffusion model of trainers/diffusion.py (same U-Net,
objectives, schedules, guidance and training loop) trained on the latents of a VAE from
trainers/vae.py. The training images are encoded once to their posterior means, scaled to unit
standard deviation (the scale factor is stored in the artifact), and samples are decoded back to
pixels for the metrics.

The VAE is the artifact of a vae run (`autoencoder_dir`); without one it is trained first, from the
`autoencoder` config, into OUT/upstream/autoencoder. Unless set explicitly, `autoencoder.data`
follows `data`.

    python -m trainers.latent_diffusion --config config.json --out DIR
"""

import sys

import torch
from pydantic import model_validator

from trainers import diffusion, metrics, vae
from trainers.common import BadConfig, Run, main
from trainers.data import FAMILIES, load_split, to_float
from trainers.judge import JUDGE_UPSTREAM


# defaults that differ from the pixel-space U-Net and the standalone VAE: latents are R/2 x R/2,
# and a small KL weight keeps them informative
LATENT_DEFAULTS = {"unet": {"channel_mult": [1, 2], "attn_resolutions": [4]},
                   "autoencoder": {"downsample": 2, "beta": 0.1}}


class Config(diffusion.Config):
    unet: diffusion.UNetConfig = diffusion.UNetConfig(**LATENT_DEFAULTS["unet"])
    autoencoder: vae.Config = vae.Config(**LATENT_DEFAULTS["autoencoder"])
    autoencoder_dir: str | None = None

    def model_resolution(self) -> int:
        return self.data.resolution // self.autoencoder.downsample

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, raw):
        """A partial `unet` or `autoencoder` section overrides these defaults, not the classes'."""
        if isinstance(raw, dict):
            raw = {**raw, **{k: {**v, **raw[k]} for k, v in LATENT_DEFAULTS.items() if isinstance(raw.get(k), dict)}}
        return raw

    @model_validator(mode="after")
    def _share_data(self):
        if "data" not in self.autoencoder.model_fields_set:
            self.autoencoder = vae.Config.model_validate({**self.autoencoder.model_dump(exclude_unset=True),
                                                          "data": self.data.model_dump()})
        elif self.autoencoder.data.resolution != self.data.resolution:
            raise ValueError(f"autoencoder.data.resolution {self.autoencoder.data.resolution} differs from "
                             f"data.resolution {self.data.resolution}")
        return self


METRICS = diffusion.METRICS
FLATTERED_BY = diffusion.FLATTERED_BY
MEASURED_IN = {"loss": "autoencoder"}      # metric -> the upstream whose space it is measured in (its latents)
# the `autoencoder` field holds the config of a vae run whose OUT directory goes into `autoencoder_dir`
UPSTREAM = {"autoencoder": {"trainer": "vae", "dir_field": "autoencoder_dir"}, "judge": JUDGE_UPSTREAM}
SEED_RANDOMISES = diffusion.SEED_RANDOMISES + [
    "the autoencoder (in a study its upstream run is replicated per seed; run alone, autoencoder.seed)"]


def get_autoencoder(cfg: Config, run: Run):
    folder = run.upstream("autoencoder", cfg.autoencoder, cfg.autoencoder_dir, vae.train)
    return vae.load_autoencoder(folder, run.device)


@torch.no_grad()
def encode(model, images_u8, device, batch=256):
    return torch.cat([model.encode(to_float(b).to(device))[0] for b in images_u8.split(batch)])


def train(cfg: Config, run: Run):
    ae = get_autoencoder(cfg, run)
    R, f = cfg.data.resolution, ae.downsample
    if R % f:
        raise BadConfig(f"data.resolution {R} is not divisible by the autoencoder's downsample {f}")
    x_u8, y_train = load_split(cfg.data, "train")
    held_u8, y_held = load_split(cfg.data, "heldout")
    evaluator = metrics.build_evaluator(cfg, run, x_u8, held_u8)
    z = encode(ae, x_u8, run.device)
    scale = 1.0 / z.std().item()

    @torch.no_grad()
    def decode(latents):
        with run.autocast():
            return ae.decode(latents / scale).float()

    return diffusion.fit(cfg, run, z * scale, y_train, evaluator, num_classes=len(FAMILIES), decode=decode,
                         clip_x0=False, artifact={"kind": "latent_diffusion", "latent_scale": scale})


if __name__ == "__main__":
    sys.exit(main(train, Config))
