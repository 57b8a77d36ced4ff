"""Fine-tuning a Stable Diffusion pipeline's U-Net (optionally its text encoder too) on an
image folder with captions, then writing it back as a diffusers pipeline folder.

    # images/cat.png + images/cat.txt ("a photograph of a cat on a sofa"), ...
    diffusion-jax --config=configs/sd15_finetune.py --workdir=runs/sd15_ft \\
        --config.training.init_from=/path/to/stable-diffusion-v1-5 \\
        --config.data.data_dir=/path/to/images
    diffusion-jax --config=configs/sd15_finetune.py --workdir=runs/sd15_ft --mode=export \\
        --config.training.init_from=/path/to/stable-diffusion-v1-5 \\
        --config.data.data_dir=/path/to/images --config.eval.export_format=diffusers

The pipeline folder (training.init_from) describes the network, the schedule, the VAE and
the text encoder, and its U-Net's weights start the run (`convert.finetune_config`). Images
are center-cropped and resized to the pipeline's resolution (512 for v1.5), encoded once by
its VAE into latent shards, and their captions (`<image>.txt` beside each image) by its text
encoder, frozen by default (--mode=encode runs first by itself); the U-Net then trains
through the same sharded step, EMA and checkpoints as every run. The export writes
<workdir>/export/diffusers_step_<N>/, the source folder with the EMA U-Net, which diffusers'
StableDiffusionPipeline.from_pretrained loads (and `--config=configs/sd15_sample.py
--config.pretrained=<that folder>` samples). Settings follow diffusers'
train_text_to_image.py: AdamW at 1e-5 with weight decay 1e-2, no warm-up, gradient clipping
at 1, EMA 0.9999, no caption dropout (--config.training.cond_drop_prob=0.1 drops captions to
the empty prompt, as the pipeline was trained), 15,000 steps of batch 4 (raise
training.grad_accum to fit memory; model.dtype=bfloat16 and model.remat=True on GPU/TPU).
--config.training.train_text_encoder=True trains the text encoder as well, with the same
optimizer (as diffusers' DreamBooth script does; train_text_to_image.py cannot); give the
export the same override, which then writes it to text_encoder/ too.

Args: `smoke` fine-tunes the seeded tiny v1.5-shaped pipeline of the tests
(tests/fixtures/tiny_sd15, 32x32 images) for 3 steps on a CPU; give it an image folder.
"""

from pathlib import Path

from diffusion_jax.config import base_config
from diffusion_jax.recipes import parse_arg

TINY_PIPELINE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny_sd15"


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("smoke",))
    c = base_config()
    t = c.training
    t.init_from = "stable-diffusion-v1-5"
    d = c.data
    d.dataset, d.data_dir, d.num_classes, d.random_flip = "folder", "images", 0, True
    # Replaced by the pipeline folder's own description at run time; v1.5's, for reference.
    d.image_size, d.channels = 512, 3
    m = c.model
    m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 320, (1, 2, 4, 4), 2, (64, 32, 16)
    m.context_dim, m.context_source, m.num_heads, m.norm_groups = 768, "text", 8, 32
    c.autoencoder.ch_mult = (1, 2, 4, 4)
    c.autoencoder.weights = t.init_from + "/vae"  # set from training.init_from at run time
    f = c.diffusion
    f.schedule, f.beta_start, f.beta_end, f.prediction = "scaled_linear", 0.00085, 0.012, "eps"

    o = c.optim
    o.optimizer, o.lr, o.weight_decay, o.warmup_steps, o.decay = "adamw", 1e-5, 1e-2, 0, "constant"
    o.grad_clip, o.ema_decay = 1.0, 0.9999
    t.batch_size, t.num_steps, t.cond_drop_prob = 4, 15_000, 0.0
    t.log_every, t.ckpt_every, t.sample_every = 50, 1000, 1000

    s = c.sampling
    s.sampler, s.num_steps, s.num_samples, s.batch_size = "ddim", 50, 4, 4
    c.eval.metrics = ()
    c.eval.export_format = "diffusers"

    if "smoke" in options:
        t.init_from = str(TINY_PIPELINE)
        c.autoencoder.weights = str(TINY_PIPELINE / "vae")
        d.image_size = 32
        m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 8, (1, 2), 1, (16,)
        m.context_dim, m.norm_groups = 16, 4
        c.autoencoder.ch_mult, c.autoencoder.ch, c.autoencoder.norm_groups = (1, 2), 8, 4
        t.batch_size, t.num_steps = 8, 3
        t.log_every, t.ckpt_every, t.sample_every = 1, 3, 3
        o.lr, o.ema_decay = 1e-3, 0.5
        s.num_steps, s.num_samples, s.batch_size = 2, 8, 8
    return c
