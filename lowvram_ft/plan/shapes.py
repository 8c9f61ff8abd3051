"""A model's architecture from its config.json alone: the shape numbers (`ModelShape`), its quantizable
linear layers grouped by shape, exact parameter counts, and which layers LoRA wraps. No weights, no
torch; a config value that cannot size the model is a PlanError naming the file and key."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .inputs import LORA_TARGET_PRESETS, PlanError

# Dense families whose layers the formulas below follow exactly (gpt_oss too); others get the generic
# transformer formula, and the estimate says so.
DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the planner needs, read from config.json."""

    model_type: str
    hidden: int
    layers: int
    vocab: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int           # dense MLP width; 0 when every layer is MoE
    experts: int                # 0 for dense models
    experts_per_token: int
    expert_intermediate: int
    fused_gate_up: bool         # gpt-oss: one gate_up matrix per expert, experts and router with biases
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool               # qwen3: RMSNorm on q and k per head
    attention_sinks: bool       # gpt-oss: one learned sink logit per head
    tied_embeddings: bool
    max_positions: int
    guessed: tuple[str, ...] = ()  # fields not in the config, filled with a default


@dataclass(frozen=True)
class LinearGroup:
    """`count` identical linear layers (the ones bitsandbytes quantizes and LoRA can target)."""

    name: str            # module name LoRA targets use
    kind: str            # "attention" | "mlp" | "expert"
    in_features: int
    out_features: int
    count: int
    bias: bool


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    active: int           # per token, as OpenAI counts it: everything but the input embedding, k experts
    embedding: int
    lm_head: int          # 0 when tied to the embedding
    linear_weights: int   # attention/MLP/expert linear weights: what 4/8-bit loading quantizes
    expert_weights: int   # the experts' share of linear_weights

    @property
    def kept_16bit(self) -> int:
        """Parameters never quantized: embeddings, lm_head, routers, norms, sinks, biases."""
        return self.total - self.linear_weights


def model_shape(config: Mapping, source: str = "config.json") -> ModelShape:
    """Architecture numbers from config.json; multimodal configs use their text_config. A size that
    is not a positive integer is a PlanError naming `source` and the key."""
    cfg = config if "hidden_size" in config else config.get("text_config") or config
    if not isinstance(cfg, Mapping):
        raise PlanError(f"{source}: text_config: got {json_kind(cfg)}; expected an object")

    def size(*keys: str) -> int:
        return config_size(cfg, keys, source)

    hidden, layers, vocab = size("hidden_size"), size("num_hidden_layers"), size("vocab_size")
    missing = [key for key, value in zip(("hidden_size", "num_hidden_layers", "vocab_size"), (hidden, layers, vocab))
               if not value]
    if missing:
        raise PlanError(f"{source} lacks {', '.join(missing)}: cannot size this model")
    model_type = str(cfg.get("model_type") or config.get("model_type") or "unknown")
    guessed = []
    q_heads = size("num_attention_heads")
    if not q_heads:
        q_heads, guessed = max(1, hidden // 128), guessed + ["num_attention_heads"]
    experts = size("num_local_experts", "num_experts")
    intermediate = size("intermediate_size")
    if not intermediate:
        intermediate, guessed = 4 * hidden, guessed + ["intermediate_size"]
    is_gpt_oss = model_type == "gpt_oss"
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelShape(
        model_type=model_type,
        hidden=hidden,
        layers=layers,
        vocab=vocab,
        q_heads=q_heads,
        kv_heads=size("num_key_value_heads") or q_heads,
        head_dim=size("head_dim") or hidden // q_heads,
        intermediate=0 if experts else intermediate,
        experts=experts,
        experts_per_token=size("num_experts_per_tok", "experts_per_token") if experts else 0,
        expert_intermediate=(size("moe_intermediate_size") or intermediate) if experts else 0,
        fused_gate_up=is_gpt_oss,
        qkv_bias=attention_bias or model_type == "qwen2",
        o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        attention_sinks=is_gpt_oss,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_positions=size("max_position_embeddings") or 131072,
        guessed=tuple(guessed),
    )


def config_size(cfg: Mapping, keys: Sequence[str], source: str) -> int:
    """The first of `keys` that config.json sets (null and 0 count as unset), as a positive integer;
    0 when none is set."""
    for key in keys:
        value = cfg.get(key)
        if value is None or value == 0:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PlanError(f"{source}: {key}: got {value!r}; expected a positive integer")
        return value
    return 0


def json_kind(value) -> str:
    """What a JSON value is, in words, for a message about a config.json that holds the wrong kind."""
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def linear_groups(shape: ModelShape) -> list[LinearGroup]:
    """Every quantizable linear layer of the model, grouped by shape."""
    h, layers = shape.hidden, shape.layers
    q_dim, kv_dim = shape.q_heads * shape.head_dim, shape.kv_heads * shape.head_dim
    groups = [
        LinearGroup("q_proj", "attention", h, q_dim, layers, shape.qkv_bias),
        LinearGroup("k_proj", "attention", h, kv_dim, layers, shape.qkv_bias),
        LinearGroup("v_proj", "attention", h, kv_dim, layers, shape.qkv_bias),
        LinearGroup("o_proj", "attention", q_dim, h, layers, shape.o_bias),
    ]
    if not shape.experts:
        i = shape.intermediate
        return groups + [
            LinearGroup("gate_proj", "mlp", h, i, layers, shape.mlp_bias),
            LinearGroup("up_proj", "mlp", h, i, layers, shape.mlp_bias),
            LinearGroup("down_proj", "mlp", i, h, layers, shape.mlp_bias),
        ]
    i, n = shape.expert_intermediate, layers * shape.experts
    if shape.fused_gate_up:
        return groups + [
            LinearGroup("gate_up_proj", "expert", h, 2 * i, n, True),
            LinearGroup("down_proj", "expert", i, h, n, True),
        ]
    return groups + [
        LinearGroup("gate_proj", "expert", h, i, n, False),
        LinearGroup("up_proj", "expert", h, i, n, False),
        LinearGroup("down_proj", "expert", i, h, n, False),
    ]


def count_parameters(config_or_shape: Mapping | ModelShape) -> ParameterCounts:
    """Exact parameter counts of the architecture (no weights needed)."""
    shape = config_or_shape if isinstance(config_or_shape, ModelShape) else model_shape(config_or_shape)
    groups = linear_groups(shape)
    h, layers = shape.hidden, shape.layers
    linear = sum(g.in_features * g.out_features * g.count for g in groups)
    biases = sum(g.out_features * g.count for g in groups if g.bias)
    router = layers * shape.experts * (h + (1 if shape.fused_gate_up else 0))
    norms = layers * 2 * h + h + (layers * 2 * shape.head_dim if shape.qk_norm else 0)
    sinks = layers * shape.q_heads if shape.attention_sinks else 0
    embedding = shape.vocab * h
    lm_head = 0 if shape.tied_embeddings else shape.vocab * h
    total = linear + biases + router + norms + sinks + embedding + lm_head
    experts = [g for g in groups if g.kind == "expert"]
    expert_weights = sum(g.in_features * g.out_features * g.count for g in experts)
    expert_all = expert_weights + sum(g.out_features * g.count for g in experts if g.bias)
    idle = expert_all * (shape.experts - shape.experts_per_token) // shape.experts if shape.experts else 0
    return ParameterCounts(
        total=total,
        active=total - embedding - idle,
        embedding=embedding,
        lm_head=lm_head,
        linear_weights=linear,
        expert_weights=expert_weights,
    )


def lora_groups(shape: ModelShape, targets: str | Sequence[str]) -> list[LinearGroup]:
    """The linear groups LoRA wraps. On gpt-oss, gate_proj/up_proj/down_proj name the experts."""
    names = set(LORA_TARGET_PRESETS[targets] if isinstance(targets, str) else targets)
    if shape.fused_gate_up and names & {"gate_proj", "up_proj"}:
        names.add("gate_up_proj")
    return [g for g in linear_groups(shape) if g.name in names]


def lora_parameters(shape: ModelShape, targets: str | Sequence[str], r: int) -> int:
    return sum(r * (g.in_features + g.out_features) * g.count for g in lora_groups(shape, targets))
