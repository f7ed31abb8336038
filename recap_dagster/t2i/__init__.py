"""Text-to-image (RECAP step 3): Stable Diffusion models, the latent cache, the streamed
training data, the standalone trainer and sampling. Plain Python, no Dagster."""
