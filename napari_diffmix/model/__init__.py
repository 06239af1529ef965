"""The label-conditioned diffusion model: network, condition, checkpoints, diffusion, samplers.

``unet`` (SDM UNet and its configs), ``condition`` (label maps -> condition tensors),
``checkpoint`` (native safetensors files and official guided-diffusion ``.pt`` imports),
``diffusion`` (schedules, losses) and ``samplers`` (DDIM, DPM-Solver++, CFG, SDEdit).
Import the submodules directly; this package imports nothing heavy by itself.
"""
