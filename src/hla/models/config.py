"""Kimi Linear configuration: the release's ``config.json`` fields, validated, plus named presets.

Field names and meanings follow the released Kimi-Linear-48B-A3B ``config.json`` (spec section 5),
so ``KimiLinearConfig.from_json(dir / "config.json").to_json()`` round-trips a release config.
The layer schedule lives in ``linear_attn_config`` whose layer lists are **1-based** (as released);
everything in hla's Python API is 0-based (``is_mla_layer(i)``).

A few hla-only fields (prefixed by what they change) extend the format; transformers and vLLM
ignore unknown fields, and they default to the release behaviour:

- ``kv_a_layernorm_eps``: eps of the latent RMSNorm (1e-6 in the reference code, 1e-5 in vLLM).
- ``mla_use_output_gate``: a sigmoid output gate on MLA (``g_proj``), off in the release.
- ``moe_biased_weights``: use the bias-corrected router scores as expert weights, as the original
  remote code does by accident; the default (False) uses the unbiased scores (transformers, vLLM).
- ``kda_lower_bound``: None for Kimi Linear's softplus gate, a negative float for FLA's bounded gate.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

_RELEASE_48B_LINEAR_ATTN = {
    "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
    "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
    "head_dim": 128,
    "num_heads": 32,
    "short_conv_kernel_size": 4,
}


@dataclass
class KimiLinearConfig:
    """Hyper-parameters of a Kimi Linear model (release field names; see the module docstring)."""

    vocab_size: int = 163840
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 27
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 72  # vestigial in the release (MLA uses the qk_*/v_head_dim fields)
    hidden_act: str = "silu"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_use_nope: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    linear_attn_config: dict = field(default_factory=lambda: copy.deepcopy(_RELEASE_48B_LINEAR_ATTN))
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    moe_intermediate_size: int = 1024
    num_experts: int | None = 256
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    moe_renormalize: bool = True
    moe_router_activation_func: str = "sigmoid"
    num_expert_group: int = 1
    topk_group: int = 1
    use_grouped_topk: bool = True
    routed_scaling_factor: float = 2.446
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 163584
    eos_token_id: int | None = 163586
    pad_token_id: int | None = 163839
    model_max_length: int = 1048576
    initializer_range: float = 0.02
    use_cache: bool = True
    dtype: str = "bfloat16"
    architectures: list = field(default_factory=lambda: ["KimiLinearForCausalLM"])
    model_type: str = "kimi_linear"
    # hla extensions (defaults = release behaviour)
    kv_a_layernorm_eps: float = 1e-6
    mla_use_output_gate: bool = False
    moe_biased_weights: bool = False
    kda_lower_bound: float | None = None
    # unknown fields of a loaded config.json, written back unchanged
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"KimiLinearConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "v_head_dim"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive int, got {v!r}")
        need(self.qk_rope_head_dim >= 0, f"qk_rope_head_dim must be >= 0, got {self.qk_rope_head_dim}")
        need(self.hidden_act == "silu", f"hidden_act: only 'silu' is supported, got {self.hidden_act!r}")
        need(self.q_lora_rank is None, f"q_lora_rank: only null (no query low-rank) is supported, got "
             f"{self.q_lora_rank!r}")
        need(self.mla_use_nope, "mla_use_nope: only true (MLA without rotary embedding) is supported")
        need(self.rms_norm_eps > 0 and self.kv_a_layernorm_eps > 0, "rms_norm_eps and kv_a_layernorm_eps must be > 0")
        lac = self.linear_attn_config
        need(isinstance(lac, dict), f"linear_attn_config must be a dict, got {type(lac).__name__}")
        for key in ("full_attn_layers", "kda_layers", "head_dim", "num_heads"):
            need(key in lac, f"linear_attn_config is missing {key!r}")
        lac.setdefault("short_conv_kernel_size", 4)
        n = self.num_hidden_layers
        full, kda = list(lac["full_attn_layers"]), list(lac["kda_layers"])
        for name, lst in (("full_attn_layers", full), ("kda_layers", kda)):
            bad = [i for i in lst if not isinstance(i, int) or not 1 <= i <= n]
            need(not bad, f"linear_attn_config.{name} are 1-based layer numbers in [1, {n}], got {bad}")
            need(len(set(lst)) == len(lst), f"linear_attn_config.{name} has duplicates: {lst}")
        both = sorted(set(full) & set(kda))
        need(not both, f"layers {both} (1-based) are both in full_attn_layers and kda_layers")
        missing = sorted(set(range(1, n + 1)) - set(full) - set(kda))
        need(not missing, f"layers {missing} (1-based) are in neither full_attn_layers nor kda_layers")
        need(int(lac["head_dim"]) > 0 and int(lac["num_heads"]) > 0,
             "linear_attn_config head_dim/num_heads must be > 0")
        need(int(lac["short_conv_kernel_size"]) >= 1, "linear_attn_config.short_conv_kernel_size must be >= 1")
        need(self.first_k_dense_replace >= 0, f"first_k_dense_replace must be >= 0, got {self.first_k_dense_replace}")
        need(self.moe_layer_freq >= 1, f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
        if self.num_moe_layers > 0:
            E, k = self.num_experts, self.num_experts_per_token
            need(1 <= k <= E, f"num_experts_per_token must be in [1, num_experts={E}], got {k}")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be > 0")
            need(self.num_shared_experts >= 0, "num_shared_experts must be >= 0")
            need(self.moe_router_activation_func == "sigmoid",
                 f"moe_router_activation_func: only 'sigmoid' is supported, got {self.moe_router_activation_func!r}")
            need(E % self.num_expert_group == 0,
                 f"num_experts={E} must be divisible by num_expert_group={self.num_expert_group}")
            need(1 <= self.topk_group <= self.num_expert_group,
                 f"topk_group must be in [1, num_expert_group={self.num_expert_group}], got {self.topk_group}")
        if self.num_dense_layers > 0:
            need(self.intermediate_size > 0, "intermediate_size must be > 0 for dense layers")
        if self.kda_lower_bound is not None:
            need(self.kda_lower_bound < 0, f"kda_lower_bound must be negative or null, got {self.kda_lower_bound}")

    # ---- schedule -----------------------------------------------------------------------------------
    def is_mla_layer(self, i: int) -> bool:
        """Whether 0-based layer ``i`` is MLA (full attention); otherwise it is KDA."""
        return (i + 1) in set(self.linear_attn_config["full_attn_layers"])

    def is_moe_layer(self, i: int) -> bool:
        """Whether 0-based layer ``i`` uses the MoE feed-forward (DeepSeek-V3 convention)."""
        return bool(self.num_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def mla_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_mla_layer(i)]

    @property
    def kda_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if not self.is_mla_layer(i)]

    @property
    def num_mla_layers(self) -> int:
        return len(self.mla_layers)

    @property
    def num_kda_layers(self) -> int:
        return self.num_hidden_layers - self.num_mla_layers

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def num_dense_layers(self) -> int:
        return self.num_hidden_layers - self.num_moe_layers

    @property
    def kda_num_heads(self) -> int:
        return int(self.linear_attn_config["num_heads"])

    @property
    def kda_head_dim(self) -> int:
        return int(self.linear_attn_config["head_dim"])

    @property
    def kda_conv_size(self) -> int:
        return int(self.linear_attn_config["short_conv_kernel_size"])

    def schedule_string(self) -> str:
        """One letter per layer: ``K`` (KDA) or ``M`` (MLA), e.g. ``KKKMKKKM...``."""
        return "".join("M" if self.is_mla_layer(i) else "K" for i in range(self.num_hidden_layers))

    def with_schedule(self, schedule: str) -> KimiLinearConfig:
        """A copy with another KDA/MLA layer schedule.

        ``schedule``: ``"3:1"`` (the release pattern: MLA at 1-based layers 4, 8, ... and always the
        last layer), ``"all_mla"`` (the full-attention baseline), ``"all_kda"``, or
        ``"mla_every:N"`` (MLA at 1-based layers N, 2N, ..., plus the last layer, as the release does).
        """
        n = self.num_hidden_layers
        if schedule == "all_mla":
            full = list(range(1, n + 1))
        elif schedule == "all_kda":
            full = []
        elif schedule == "3:1" or schedule.startswith("mla_every:"):
            if schedule == "3:1":
                every = 4
            else:
                try:
                    every = int(schedule.split(":", 1)[1])
                except ValueError:
                    every = 0
                if every < 1:
                    raise ValueError(f"schedule: 'mla_every:N' needs a positive int N, got {schedule!r}")
            full = sorted(set(range(every, n + 1, every)) | {n})
        else:
            raise ValueError(
                f"schedule: expected '3:1', 'all_mla', 'all_kda' or 'mla_every:N', got {schedule!r}"
            )
        lac = dict(self.linear_attn_config)
        lac["full_attn_layers"] = full
        lac["kda_layers"] = [i for i in range(1, n + 1) if i not in set(full)]
        return self.replace(linear_attn_config=lac)

    def replace(self, **changes: Any) -> KimiLinearConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(copy.deepcopy(self), **changes)

    # ---- JSON -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(copy.deepcopy(self.extra))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> KimiLinearConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: copy.deepcopy(v) for k, v in d.items() if k in names}
        extra = {k: copy.deepcopy(v) for k, v in d.items() if k not in names}
        # Some exports write the dtype under the older key.
        if "dtype" not in known and "torch_dtype" in extra:
            known["dtype"] = extra["torch_dtype"]
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path_or_dict: str | os.PathLike | dict) -> KimiLinearConfig:
        """Read a ``config.json`` (a file, a model directory holding one, or an already parsed dict)."""
        if isinstance(path_or_dict, dict):
            return cls.from_dict(path_or_dict)
        path = os.fspath(path_or_dict)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config: no such file {path!r}")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The config as JSON text; also written to ``path`` (a file or a directory) when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            path = os.fspath(path)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path, "w") as f:
                f.write(text)
        return text

    # ---- presets --------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> KimiLinearConfig:
        """A named configuration: ``tiny`` (tests), ``small`` (CPU demo), ``1b`` (GPU), ``kimi-linear-48b``."""
        if name not in PRESETS:
            raise ValueError(f"preset: unknown name {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[name]()

    def parameter_counts(self) -> dict:
        """Parameter counts by formula (no tensors built): total, active per token, and by part."""
        return _parameter_counts(self)


def _lac(num_layers: int, heads: int, head_dim: int, every: int = 4) -> dict:
    full = sorted(set(range(every, num_layers + 1, every)) | {num_layers})
    return {
        "full_attn_layers": full,
        "kda_layers": [i for i in range(1, num_layers + 1) if i not in set(full)],
        "head_dim": head_dim,
        "num_heads": heads,
        "short_conv_kernel_size": 4,
    }


def _tiny() -> KimiLinearConfig:
    # 4 layers KKKM, layer 0 dense, 1..3 MoE; small enough for fwd+bwd tests in well under a second.
    return KimiLinearConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        linear_attn_config=_lac(4, heads=2, head_dim=16),
        first_k_dense_replace=1, moe_intermediate_size=32, num_experts=8, num_experts_per_token=2,
        num_shared_experts=1, routed_scaling_factor=2.446,
        bos_token_id=256, eos_token_id=257, pad_token_id=258, model_max_length=4096, dtype="float32",
    )


def _small() -> KimiLinearConfig:
    # A few million parameters: trains on a laptop CPU in minutes.
    return KimiLinearConfig(
        vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=4, head_dim=64,
        kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        linear_attn_config=_lac(8, heads=4, head_dim=64),
        first_k_dense_replace=1, moe_intermediate_size=128, num_experts=16, num_experts_per_token=4,
        num_shared_experts=1, routed_scaling_factor=2.446,
        bos_token_id=256, eos_token_id=257, pad_token_id=258, model_max_length=65536, dtype="float32",
    )


def _one_b() -> KimiLinearConfig:
    # Dense ~1.37B Kimi-architecture model, the shape of the transformers peer measured in
    # gpu-workflow.md: 24 layers (18 KDA + 6 MLA), hidden 2048, 16 heads of 128, no MoE.
    return KimiLinearConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, head_dim=128,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        linear_attn_config=_lac(24, heads=16, head_dim=128),
        first_k_dense_replace=24, num_experts=None,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, model_max_length=1048576,
    )


def _kimi_48b() -> KimiLinearConfig:
    return KimiLinearConfig()


PRESETS = {"tiny": _tiny, "small": _small, "1b": _one_b, "kimi-linear-48b": _kimi_48b}


def _parameter_counts(c: KimiLinearConfig) -> dict:
    d = c.hidden_size
    H, K = c.kda_num_heads, c.kda_head_dim
    D = H * K
    W = c.kda_conv_size
    kda = 3 * D * d + 3 * D * W + 2 * (K * d + D * K) + D + H + H * d + K + D * d
    Hm = c.num_attention_heads
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    mla = (d * Hm * qk + d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
           + c.kv_lora_rank * Hm * (c.qk_nope_head_dim + c.v_head_dim) + Hm * c.v_head_dim * d)
    if c.mla_use_output_gate:
        mla += d * Hm * c.v_head_dim
    dense = 3 * d * c.intermediate_size
    E = c.num_experts or 0
    expert = 3 * d * c.moe_intermediate_size
    shared = c.num_shared_experts * expert
    router = E * d + E
    moe_total = E * expert + shared + router
    moe_active = c.num_experts_per_token * expert + shared + router
    norms = 2 * d
    embed = c.vocab_size * d
    head = 0 if c.tie_word_embeddings else c.vocab_size * d
    total = embed + head + d
    active = total
    for i in range(c.num_hidden_layers):
        mixer = mla if c.is_mla_layer(i) else kda
        total += norms + mixer
        active += norms + mixer
        if c.is_moe_layer(i):
            total += moe_total
            active += moe_active
        else:
            total += dense
            active += dense
    return {
        "total": total, "active": active, "embedding": embed, "lm_head": head,
        "kda_layer": kda, "mla_layer": mla, "dense_mlp": dense, "moe_layer": moe_total,
    }
