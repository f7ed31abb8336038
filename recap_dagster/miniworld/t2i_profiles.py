"""Named size/schedule presets for the miniworld text-to-image model.

``MINIWORLD_PROFILE`` was first sized for the budget "VAE + base + ONE fine-tune + evaluation
in ~12 single-thread CPU minutes" (the base is cached; the job fine-tunes 4 variants); the
fine-tunes have since grown to 1,200 steps (last point below). Measured with
sizing runs of the earlier in-memory trainer on the shared 2-core machine (178 eval
prompts, 40 per category):

- Previous default UNet (cross-attention at all three levels), base 200 steps on alt text,
  then 150 fine-tune steps at lr 1e-3, batch 32: alttext object 0.152 / count err 1.12 /
  position 0.025; recap_mix 0.149 / 1.14 / 0.000 (cfg 3; cfg 6 no better). Both at the
  floor: samples are fragmented blobs, the image model itself is undertrained.
- The top-level (16x16 latent) transformer block costs half of a UNet step: 0.59 vs 0.29
  CPU-s per batch-32 step without it (``unet_cross_attention=(False, True, True)``), so
  this profile drops it and spends the time on steps (8x8 and 4x4 levels remain
  text-conditioned, enough to place objects on a 3x3 grid).
- This profile, measured (cfg 4 unless noted, 178 prompts; CPU seconds of one thread): VAE + base
  212 s; fine-tune 400 steps ~180 s; sampling+scoring 24 s. Total ~7 of the 12 minutes.
  base: object 0.129 / count err 1.13 / count acc 0.017 / position 0.013.
  alttext  ft @200: 0.104 / 1.17 / 0.000 / 0.013;  @400: 0.084 / 1.18 / 0.000 / 0.000.
  recap_mix ft @200: 0.124 / 1.15 / 0.011 / 0.013; @400: 0.185 / 1.10 / 0.022 / 0.000.
  At cfg 7 (the default here): base 0.104 / 1.15 / 0.011 / 0.013; alttext @400 0.093 /
  1.17 / 0.011 / 0.000; recap_mix @400 0.211 / 1.07 / 0.028 / 0.000.
  So recap_mix pulls ahead on objects (+120% relative, ~3 standard errors) and counts
  (-7% at cfg 4, -9% at cfg 7) by 400 steps, but
  everything is still near the floor and position is 0 for both.
- The prototype needed ~1,500 steps at batch 64 on ground-truth captions to reach object
  accuracy 0.67 (~100k samples), so the unused CPU-minutes went into fine-tune steps:
  1,200 instead of 400 (the same runs, cfg 7, one thread, two jobs
  sharing the 2 cores; the base of this benchmark's miniworld: 0.067 / 1.19 / 0.006 /
  0.013):
  plain MSE: alttext 0.107 / 1.16 / 0.017 / 0.025, recap_mix 0.329 / 1.10 / 0.039 /
  0.100 (objects +208%, count error -5.6%, position 4x);
  Min-SNR weighting, gamma 5 (the default here): alttext 0.118 / 1.17 / 0.011 / 0.000,
  recap_mix 0.388 / 1.07 / 0.056 / 0.075 (objects +229%, count error -8.0%).
  With an EMA of the fine-tuned weights (decay 0.995) on top: alttext 0.110 / 1.15 /
  0.017 / 0.000, recap_mix 0.390 / 1.05 / 0.062 / 0.025 (count error -9.0%): the final
  numbers barely move, so the profile keeps no EMA. In the main job the snapshots of one
  run swing by up to 0.2 in object accuracy between steps 400, 800 and 1,200 (constant
  lr 1e-3); whether EMA or a decaying lr damps that is not measured yet.
  A fine-tune is ~570 s of one thread at 1,200 steps (0.47 s/step with a neighbour).
  Samples are clean shapes, but the alt-text model ignores most of the prompt (random
  scenes, colours collapsed to orange/blue/brown): its conditioning is what alt text
  teaches, and that is the point of the experiment.

Retuned on the validation prompts (issue 24; oracle fine-tunes, default recipe, seed 0,
CFG 7, 178 validation prompts; position = both objects in their stated 3x3 cells; chance =
objects found / 9):

- attention heads 8 at every level (heads of 4 and 8 channels): objects 0.492, count err
  0.992, position 0.075 (chance 0.047: 1.6x), FID 0.74; 448 s for 1,200 steps alone on 2
  threads.
- heads (1, 2, 2) (this profile): 0.444 / 1.008 / 0.088 (chance 0.042: 2.1x) / 0.52, the
  same within the prompts' noise (object accuracy's standard error ~0.04), and a training
  step 20% cheaper (0.195 vs 0.242 s at batch 32 on 2 threads).
- cross-attention at 16x16 too (heads (1, 2, 2)): 0.326 / 1.045 / 0.050 (chance 0.031:
  1.6x; given both objects found 0.25 against chance's 0.11) at a 47% dearer step (0.286 s).
  Not taken: no nearer to 3x chance on position, and fewer objects found.
  With 16x16 cross-attention and 8 heads (0.673 s) a step cost 2.8x.

No variant reaches position at 3x chance yet: the oracle (true descriptions, every
position stated in the long half) places objects no better than about 2x chance. Why, as
measured later (``benchmarks/position_follows_text.py``; oracle fine-tunes, seed 0, the
40 validation position prompts and 18 single-object ones with a stated cell, CFG 7):

- The layout comes from the initial noise, not the prompt: one noise seed with "a blue
  square <cell>" for all nine cells gives the same layout for every cell (6 of 6 seeds).
  CFG 4, 10 or 14 changes nothing (1.1-1.5x chance on the validation position prompts).
- The schedule never hides it: one object's latent (norm ~34 in the scaled latent
  space) is still 3.0 noise standard deviations visible at SD's noisiest training
  timestep (5.2 at t=900, 10.6 at t=750), so the denoiser reads the layout off its input
  at every timestep and never needs the position words.
- Not the captions: an oracle fine-tuned on captions in the prompts' own words, every
  object with its cell in every caption, placed at 1.15x chance (objects 0.30).
- Tried and not taken, each with a base rebuilt for it: v-prediction with SD's betas
  rescaled to zero terminal SNR ("trailing" sampling): 1.69x, objects 0.35 (0.56 before);
  offset noise 0.1: 1.59x, objects 0.32; beta_end 0.02 (the object 0.66 sigma visible at
  the last timestep, 1.66 at t=900): 1.06x, objects 0.32, 10 of 12 seeds one layout for
  every cell; v-prediction with beta_end 0.03 (0.41 sigma at t=900): objects 0.20, the
  400-step base does not learn to draw under so much noise, and a 1,200-step base under it
  did worse (objects 0.12, single objects never found): v-prediction under this recipe
  (Min-SNR, lr 1e-3, DPM-Solver) is itself unproven here, so the next try is epsilon with a
  noisier schedule and a longer base, or the noisiest timesteps drawn more often.
- Min-SNR weights an x0 error by min(SNR, 5) whatever the prediction type, so at the
  noisiest timesteps, where only the text can say where an object goes, it leaves
  v-prediction no more signal than epsilon. Plain v-prediction loss (weight 1 + SNR there)
  was tried too, on its own 400-step base: with SD's betas 1.42x (single objects 1.64x),
  objects 0.31; with zero terminal SNR 0.82x, objects 0.27. Not taken.
- Not the length of the fine-tune: the oracle trained for 2,400 steps instead of 1,200
  (snapshots every 600; 4 images per prompt: 160 two-object and 72 single-object position
  images) finds more objects as it trains (both objects of a position prompt 0.26, 0.48,
  0.57, 0.71 at 600, 1,200, 1,800, 2,400 steps; object accuracy 0.56 -> 0.73 at 1,200 ->
  2,400) but places them no better: 2.0x, 1.9x, 2.0x, 1.8x chance (single objects 0.7x,
  2.0x, 2.0x, 1.9x). Placement from the text plateaus at about 2x chance by 1,200 steps.

All the ratios above use the chance of that time, objects found / 9. Any drawn copy in
the stated cell is a hit, so chance is the cells the asked-for kind occupies / 9 (stop 40,
``miniworld/evaluator.py``); re-graded that way (4 images per prompt), the oracle of this
profile places at 1.28x chance on the 40 position prompts (1.87x before) and 1.21x on the
18 single objects (1.98x): hardly above chance. The 2,400-step oracle: 1.03x (1.78x
before), single objects 1.04x; v-prediction under zero terminal SNR, plain loss: 1.02x.
Why, and what else failed:

- The denoiser does not read the position words. One-object scenes noised at t and
  denoised with the true cell, a wrong cell or no prompt (``x0_error_at_timestep``): the
  predicted clean latent's error with the true cell equals that with a wrong cell within
  0.003 at t = 300, 600, 800, 900 and 999 (this profile's oracle: 0.3415 vs 0.3410
  at 900, 0.9961 vs 0.9970 at 999), in every oracle measured: v-prediction with and
  without zero terminal SNR too, where the last timestep hides the layout and only the
  words could give it (0.5697 vs 0.5696). The colour and shape words do lower it.
- Not the UNet's sense of place: SD's UNet has no position embedding (a feature learns
  where it is only from zero padding). A fixed sine-cosine embedding of (row, column)
  added after ``conv_in``, on a base rebuilt with it: 1.05x chance (single objects 0.98x),
  objects 0.44; with v-prediction, zero terminal SNR and plain v loss 0.98x, objects 0.28;
  with cross-attention at 16x16 as well 0.88x (single 1.59x), objects 0.33. In each the
  x0 error with the true and a wrong cell stayed equal (0.3949 vs 0.3943 at t=999 for the
  last). The last trained for 2,400 steps: objects 0.35, 1.04x even by the old chance, and
  still 0.3806 vs 0.3810. Not taken.

``QUICK_PROFILE`` exercises the same code paths in seconds for tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from recap_dagster.storage.fingerprint import config_key
from recap_dagster.t2i.model import TinyT2IConfig
from recap_dagster.t2i.train import TrainConfig


@dataclass(frozen=True)
class T2IProfile:
    """The base text-to-image model's recipe on the miniworld (the fine-tunes' settings are
    the profiles' run config: profiles/<name>.yaml, sd_checkpoints)."""

    name: str
    model: TinyT2IConfig = field(default_factory=TinyT2IConfig)
    vae_steps: int = 300
    vae_batch_size: int = 32
    vae_learning_rate: float = 2e-3
    base: TrainConfig = field(default_factory=TrainConfig)  # on alt text
    corpus_limit: int | None = None  # use at most this many corpus images
    seed: int = 0

    def base_digest(self) -> str:
        """Hash of what determines the base model (not the fine-tune or sampling)."""
        data = {
            "model": self.model.to_dict(),
            "vae": [self.vae_steps, self.vae_batch_size, self.vae_learning_rate],
            "base": asdict(self.base),
            "corpus_limit": self.corpus_limit,
            "seed": self.seed,
        }
        return config_key(data)


MINIWORLD_PROFILE = T2IProfile(
    name="miniworld",
    # Two heads of 32 channels where there is attention (diffusers' "attention_head_dim"
    # counts heads: 8 made heads of 8 channels); the top level (1) has none.
    model=TinyT2IConfig(
        unet_cross_attention=(False, True, True), unet_attention_head_dim=(1, 2, 2)
    ),
    vae_steps=400,
    vae_batch_size=16,
    vae_learning_rate=4e-3,
    base=TrainConfig(
        steps=400, learning_rate=2e-3, batch_size=32, micro_batch_size=32,
        lr_warmup_steps=20, checkpoint_every=100,
    ),
)  # fmt: skip

QUICK_PROFILE = T2IProfile(
    name="quick",
    model=TinyT2IConfig(
        unet_block_out_channels=(16, 32),
        unet_cross_attention=(False, True),
        unet_attention_head_dim=8,
        text_hidden_size=32,
        text_layers=1,
        text_heads=2,
        text_intermediate_size=64,
        vae_block_out_channels=(8,),
        vae_norm_num_groups=4,
    ),
    vae_steps=5,
    vae_batch_size=8,
    base=TrainConfig(steps=3, learning_rate=1e-3, batch_size=8, micro_batch_size=8),
    corpus_limit=32,
)

PROFILES: dict[str, T2IProfile] = {p.name: p for p in (MINIWORLD_PROFILE, QUICK_PROFILE)}


def get_profile(profile: str | T2IProfile) -> T2IProfile:
    return PROFILES[profile] if isinstance(profile, str) else profile


__all__ = ["MINIWORLD_PROFILE", "PROFILES", "QUICK_PROFILE", "T2IProfile",
           "get_profile", "replace"]  # fmt: skip
