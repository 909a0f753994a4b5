"""RoPE settings read from a Hugging Face config, in the form pagoda's fused RoPE + KV append takes.

The rotation itself happens inside `pagoda.append_paged_kv_cache_with_rope` (queries in place, keys on
their way into the cache); this module only turns the config into its arguments. Supported
``rope_type``: "default", "linear" (positions divided by ``factor``) and "llama3" (Llama 3.1's
frequency-band scaling). Both spellings are read: transformers 5's ``config.rope_parameters`` (with
``rope_theta`` inside) and the older ``config.rope_scaling`` + ``config.rope_theta``.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RopeConfig", "SUPPORTED_ROPE_TYPES"]

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(slots=True)
class RopeConfig:
    """Neox-style (non-interleaved) RoPE over the first ``rotary_dim`` dims of each head.

    ``rope_type`` "llama3" uses ``factor``, ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position_embeddings``; "linear" uses ``factor``; "default" none of them.
    """

    rotary_dim: int
    rope_theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
        if isinstance(self.rotary_dim, bool) or not isinstance(self.rotary_dim, int) or self.rotary_dim < 2 \
                or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be an even int >= 2, got {self.rotary_dim!r}")
        for name in ("rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")

    @classmethod
    def from_hf_config(cls, config, head_dim: int) -> RopeConfig:
        """Read the RoPE settings of a transformers ``PretrainedConfig`` (any version's spelling)."""
        params = dict(getattr(config, "rope_parameters", None) or {})
        legacy = getattr(config, "rope_scaling", None)
        if not params and legacy:
            params = dict(legacy)
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
        fields = dict(rotary_dim=int(head_dim * partial), rope_theta=float(theta if theta is not None else 10000.0),
                      rope_type=rope_type)
        if rope_type in ("linear", "llama3"):
            fields["factor"] = float(params["factor"])
        if rope_type == "llama3":
            fields.update(low_freq_factor=float(params["low_freq_factor"]),
                          high_freq_factor=float(params["high_freq_factor"]),
                          original_max_position_embeddings=int(params["original_max_position_embeddings"]))
        return cls(**fields)

    def append_kwargs(self) -> dict:
        """Keyword arguments of `pagoda.append_paged_kv_cache_with_rope` for these settings."""
        kwargs = dict(rotary_dim=self.rotary_dim, interleave=False, rope_theta=self.rope_theta,
                      rope_scale=self.factor if self.rope_type != "default" else 1.0)
        if self.rope_type == "llama3":
            kwargs.update(llama31=True, low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                          old_context_len=self.original_max_position_embeddings)
        return kwargs
