"""Class-conditional sampling from a UNet2DModel that fedrun trained: the pipeline ``fedrun export``
writes next to the model, as ``pipeline.py``.

This file imports only torch and diffusers (never fedrun): ``fedrun export`` copies it verbatim
into the exported folder, whose model_index.json names it, so that with only diffusers and torch
installed::

    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("OUT", trust_remote_code=True)
    images = pipe(class_labels=[0, 1, 2, 3], generator=torch.Generator().manual_seed(0)).images

samples what fedrun's own sampler samples. ``DDPMPipeline`` cannot: it has no class labels.

The loop is diffusers' own: ``scheduler.set_timesteps``, the UNet on each timestep, then
``scheduler.step`` (with ``eta`` and ``generator`` where the scheduler takes them), so any
diffusers scheduler configured for the model's prediction type can replace the exported
``DDIMScheduler``. Classifier-free guidance (a model trained with fedrun's label dropout knows
the null class, the last row of its class embedding) evaluates the labels and the null class in
one batch and uses (1 + w) out(label) - w out(null), as fedrun does. The defaults of
``num_inference_steps``, ``eta`` and ``guidance_scale`` are those of the run that was exported
(its ``diffusion.sample_steps``, ``diffusion.eta`` and ``diffusion.guidance``), stored in
model_index.json.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class FedrunClassConditionalPipeline(DiffusionPipeline):
    """A UNet2DModel with a class embedding, sampled with its scheduler; see the module docstring."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, null_class: int | None = None, guidance_scale: float = 0.0,
                 num_inference_steps: int = 100, eta: float = 1.0):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(null_class=null_class, guidance_scale=guidance_scale,
                                num_inference_steps=num_inference_steps, eta=eta)

    @torch.no_grad()
    def __call__(self, class_labels=None, num_images: int = 1, num_inference_steps: int | None = None,
                 eta: float | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil",
                 return_dict: bool = True):
        """Images of ``class_labels`` (one per label; an unconditional model: ``num_images``), in
        [0, 1]: PIL images (``output_type="pil"``), an array [N, H, W, C] ("np") or a tensor
        [N, C, H, W] ("pt"). All noise comes from ``generator``."""
        unet, scheduler = self.unet, self.scheduler
        steps = num_inference_steps or self.config.num_inference_steps
        eta = self.config.eta if eta is None else eta
        w = self.config.guidance_scale if guidance_scale is None else guidance_scale
        device = self._execution_device
        if unet.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels: this model is class-conditional; pass one label per image, "
                                 "e.g. class_labels=list(range(10))")
            labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
            n = len(labels)
        else:
            labels, n, w = None, num_images, 0.0
        if w and self.config.null_class is None:
            raise ValueError("guidance_scale: this model was trained without label dropout (no null class); "
                             "pass guidance_scale=0")
        size = unet.config.sample_size
        h, wd = (size, size) if isinstance(size, int) else tuple(size)
        x = randn_tensor((n, unet.config.in_channels, h, wd), generator=generator, device=device,
                         dtype=unet.dtype)
        scheduler.set_timesteps(steps, device=device)
        x = x * scheduler.init_noise_sigma
        takes = inspect.signature(scheduler.step).parameters
        extra = {"eta": eta} if "eta" in takes else {}
        if "use_clipped_model_output" in takes:  # an x0-clipping scheduler re-derives eps from x0, as fedrun
            extra["use_clipped_model_output"] = bool(scheduler.config.get("clip_sample", False))
        if "generator" in takes:
            extra["generator"] = generator
        for t in self.progress_bar(scheduler.timesteps):
            x_in = scheduler.scale_model_input(x, t)
            if w:  # conditional and unconditional in one batch
                null = torch.full_like(labels, self.config.null_class)
                both = unet(torch.cat([x_in, x_in]), t, class_labels=torch.cat([labels, null])).sample
                cond, uncond = both.chunk(2)
                out = cond + w * (cond - uncond)
            else:
                out = unet(x_in, t, class_labels=labels).sample
            x = scheduler.step(out, t, x, **extra).prev_sample
        images = x.clamp(-1, 1) / 2 + 0.5
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
