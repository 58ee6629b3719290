"""The four fused ops. Each module holds the public op, its plain-PyTorch reference `<op>_ref`,
its argument checks and the call into the backend that fastdiff.backends picks."""
from .q_sample import q_sample, q_sample_ref  # noqa: F401
from .group_norm_silu import group_norm_silu, group_norm_silu_ref  # noqa: F401
from .attention import attention, attention_ref  # noqa: F401
from .sampler_step import sampler_step, sampler_step_ref  # noqa: F401
from .multistep_step import multistep_step, multistep_step_ref  # noqa: F401
