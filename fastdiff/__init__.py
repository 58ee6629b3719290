"""fastdiff: fused GPU kernels that make diffusion models sample and train fast."""
__version__ = "0.1.0"

from .backends import use_backend, backend_status  # noqa: F401
from .schedule import Schedule  # noqa: F401
from . import ops  # noqa: F401
from .ops import q_sample, sampler_step, group_norm_silu, attention  # noqa: F401
from .ops import multistep_step  # noqa: F401
from . import nn  # noqa: F401
from .integrations.diffusers import optimize, restore  # noqa: F401  (diffusers imported lazily)
from .unet import UNet2DModel  # noqa: F401
from .samplers import DDPMSampler, DDIMSampler  # noqa: F401
from .samplers import DPMSolverSampler, UniPCSampler  # noqa: F401
from .pipelines import DDPMPipeline, DDIMPipeline  # noqa: F401
from .train import TrainConfig, Trainer  # noqa: F401
