"""Hugging Face checkpoints in and out: Llama 2/3/3.1/3.2, Mistral and Qwen2 folders
(config.json + model.safetensors, or shards listed by model.safetensors.index.json) read
into a plain `models.llama.Llama`, and written back so that
`transformers.AutoModelForCausalLM.from_pretrained` gives the same logits.

Loading is all-or-nothing: config.json is checked key by key, then every tensor's name and
shape is read from the safetensors headers and checked against the model, and only then
is any weight read.  Errors name the file and the key.  No transformers import here.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .llama import Llama, LlamaConfig
from .rope import FROM_CHECKPOINT, ROPE_TYPES, RopeConfig, Rotary

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
MAX_SHARD_BYTES = 5 * 2**30

# (Hugging Face name, ours) for one layer; {} is the layer index
LAYER_KEYS = [
    ("model.layers.{}.input_layernorm.weight", "layers.{}.attn_norm.weight"),
    ("model.layers.{}.self_attn.q_proj.weight", "layers.{}.attn.wq.weight"),
    ("model.layers.{}.self_attn.k_proj.weight", "layers.{}.attn.wk.weight"),
    ("model.layers.{}.self_attn.v_proj.weight", "layers.{}.attn.wv.weight"),
    ("model.layers.{}.self_attn.o_proj.weight", "layers.{}.attn.wo.weight"),
    ("model.layers.{}.self_attn.q_proj.bias", "layers.{}.attn.wq.bias"),
    ("model.layers.{}.self_attn.k_proj.bias", "layers.{}.attn.wk.bias"),
    ("model.layers.{}.self_attn.v_proj.bias", "layers.{}.attn.wv.bias"),
    ("model.layers.{}.self_attn.o_proj.bias", "layers.{}.attn.wo.bias"),
    ("model.layers.{}.post_attention_layernorm.weight", "layers.{}.mlp_norm.weight"),
    ("model.layers.{}.mlp.gate_proj.weight", "layers.{}.mlp.w1.weight"),
    ("model.layers.{}.mlp.up_proj.weight", "layers.{}.mlp.w3.weight"),
    ("model.layers.{}.mlp.down_proj.weight", "layers.{}.mlp.w2.weight"),
]
TOP_KEYS = [("model.embed_tokens.weight", "embed.weight"), ("model.norm.weight", "norm.weight"),
            ("lm_head.weight", "output.weight")]
# tensors some checkpoints carry that the model recomputes
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def hf_names(cfg: LlamaConfig) -> dict[str, str]:
    """Our state_dict name -> the Hugging Face name, for the tensors a model of `cfg` has."""
    ours = {o: h for h, o in TOP_KEYS}
    for i in range(cfg.n_layers):
        ours.update({o.format(i): h.format(i) for h, o in LAYER_KEYS})
    return ours


def _model_state(model: Llama) -> dict[str, torch.Tensor]:
    """The model's tensors by our name, the tied output left out."""
    state = dict(model.state_dict())
    if model.cfg.tie_embeddings:
        state.pop("output.weight")
    return state


# ---- config.json <-> LlamaConfig --------------------------------------------------------
def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise ValueError(f"{file} does not exist: a Hugging Face checkpoint folder needs {file.name}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e


def _need(hf: dict, key: str, file: Path):
    if hf.get(key) is None:
        raise ValueError(f"{file} has no {key!r}, which this model needs")
    return hf[key]


def rope_from_hf(hf: dict, file: Path) -> tuple[float, RopeConfig]:
    """(theta, RopeConfig) from `rope_parameters` (transformers >= 5) or the older top-level
    `rope_theta` / `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    where = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{file}: {where}.rope_type={rope_type!r} is not implemented here; "
                         f"supported: {', '.join(ROPE_TYPES)}")
    if params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{file}: partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    known = {f.name for f in dataclasses.fields(RopeConfig)} - {"type", "theta", "seq_len", "max_position_embeddings"}
    unknown = sorted(set(params) - known)
    if unknown and rope_type != "default":
        raise ValueError(f"{file}: {where} key(s) {unknown} are not implemented for rope type {rope_type}")
    kept = {k: v for k, v in params.items() if k in known}
    rope = RopeConfig(type=rope_type, theta=float(theta), max_position_embeddings=int(_need(hf, "max_position_embeddings", file)),
                      **kept)
    return float(theta), rope


def config_from_hf(path: str | Path) -> LlamaConfig:
    """The model shape and RoPE of a checkpoint folder's config.json (vocab included)."""
    file = Path(path) / CONFIG_FILE
    hf = _read_json(file)
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise ValueError(f"{file}: model_type={family!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    for arch in hf.get("architectures") or []:
        if arch not in ARCHITECTURES.values():
            raise ValueError(f"{file}: architectures={arch!r} is not supported; supported: "
                             f"{', '.join(ARCHITECTURES.values())}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{file}: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if hf.get("mlp_bias"):
        raise ValueError(f"{file}: mlp_bias=true is not supported")
    window = hf.get("sliding_window")
    if family == "qwen2" and hf.get("use_sliding_window") or family == "mistral" and window is not None \
            and window < hf.get("max_position_embeddings", 0):
        raise ValueError(f"{file}: sliding_window={window} (use_sliding_window={hf.get('use_sliding_window')}) is not "
                         f"expressible as this model's attention; only checkpoints without a sliding window load")
    dim, heads = int(_need(hf, "hidden_size", file)), int(_need(hf, "num_attention_heads", file))
    if hf.get("head_dim") not in (None, dim // heads):
        raise ValueError(f"{file}: head_dim={hf['head_dim']} differs from hidden_size / num_attention_heads = "
                         f"{dim // heads}; not supported")
    theta, rope = rope_from_hf(hf, file)
    attention_bias = bool(hf.get("attention_bias", False))
    return LlamaConfig(
        vocab_size=int(_need(hf, "vocab_size", file)), dim=dim, n_layers=int(_need(hf, "num_hidden_layers", file)),
        n_heads=heads, n_kv_heads=int(hf.get("num_key_value_heads") or heads),
        ffn_dim=int(_need(hf, "intermediate_size", file)), rope_theta=theta, rope=rope,
        norm_eps=float(_need(hf, "rms_norm_eps", file)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or attention_bias, o_bias=family != "qwen2" and attention_bias,
        path=str(path),
    )


def config_to_hf(cfg: LlamaConfig, dtype: torch.dtype) -> dict:
    """config.json for `cfg`: Qwen2 when only q/k/v have biases, else Llama."""
    if cfg.o_bias and not cfg.qkv_bias:
        raise ValueError("a model with an output-projection bias but no q/k/v biases has no Hugging Face equivalent")
    family = "qwen2" if cfg.qkv_bias and not cfg.o_bias else "llama"
    rope = cfg.rope
    theta = rope.theta or cfg.rope_theta
    params = {"rope_type": rope.type, "rope_theta": theta}
    if rope.type != "default":
        params["factor"] = rope.factor
    if rope.type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = rope.original_context
    if rope.type == "llama3":
        params.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    if rope.type == "yarn":
        params.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
        params.update({k: getattr(rope, k) for k in ("attention_factor", "mscale", "mscale_all_dim")
                       if getattr(rope, k) is not None})
    hf = {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden_dim,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": rope.context, "rope_parameters": params,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if family == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf


# ---- weights ----------------------------------------------------------------------------
def _weight_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it, from the index or the single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map'")
        files = {name: folder / shard for name, shard in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise ValueError(f"{index} lists {file.name}, which does not exist in {folder}")
        return files
    single = folder / WEIGHTS_FILE
    if not single.is_file():
        raise ValueError(f"{folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _check_weights(files: dict[str, Path], model: Llama) -> dict[str, str]:
    """Every tensor the model needs is present with its shape, and nothing else is; returns
    our name -> HF name.  Reads only the safetensors headers."""
    from safetensors import safe_open

    names = hf_names(model.cfg)
    wanted = {names[ours]: (ours, tuple(t.shape)) for ours, t in _model_state(model).items()}
    present: dict[str, tuple[Path, tuple]] = {}
    for file in set(files.values()):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                present[name] = (file, tuple(f.get_slice(name).get_shape()))
    for hf_name, (ours, shape) in wanted.items():
        if hf_name not in present:
            where = ", ".join(sorted({p.name for p in files.values()})) or "the weights"
            raise ValueError(f"{where}: tensor {hf_name!r} is missing (config.json asks for it)")
        file, got = present[hf_name]
        if got != shape:
            raise ValueError(f"{file}: tensor {hf_name!r} has shape {list(got)} but config.json implies {list(shape)}")
    extra = sorted(n for n in present if n not in wanted and not n.endswith(IGNORED_SUFFIXES)
                   and not (n == "lm_head.weight" and model.cfg.tie_embeddings))
    if extra:
        raise ValueError(f"{present[extra[0]][0]}: tensor(s) {extra[:4]} are not part of this model "
                         f"(config.json: tie_word_embeddings, attention_bias?)")
    return {ours: hf_name for hf_name, (ours, _) in wanted.items()}


def assign_weights(model: Llama, state: dict[str, torch.Tensor], source: str) -> Llama:
    """Put `state` (every tensor by our name, already checked; the tied output may be absent)
    into a model built on the meta device, then compute its RoPE buffers."""
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or set(result.missing_keys) - {"output.weight"}:
        raise ValueError(f"{source}: tensors do not match the model: {result}")
    if model.cfg.tie_embeddings:
        model.output.weight = model.embed.weight
    for module in model.modules():
        if isinstance(module, Rotary):
            module.reset()
    return model


def with_rope(cfg: LlamaConfig, rope: RopeConfig | None) -> LlamaConfig:
    """A checkpoint's config with its RoPE replaced by `rope` (context extension).  Unset in
    `rope`: theta and max_position_embeddings keep the checkpoint's, and the original context
    a scaling rule starts from is the checkpoint's max_position_embeddings (the context it was
    trained for).  None or type `checkpoint`: unchanged."""
    if rope is None or rope.type == FROM_CHECKPOINT:
        return cfg
    ckpt = cfg.rope
    return dataclasses.replace(cfg, rope=dataclasses.replace(
        rope, theta=rope.theta or ckpt.theta, max_position_embeddings=rope.max_position_embeddings or ckpt.context,
        original_max_position_embeddings=rope.original_max_position_embeddings or ckpt.context))


def from_pretrained(path: str | Path, *, dtype: torch.dtype = torch.float32, rope: RopeConfig | None = None) -> Llama:
    """A Llama with the weights of the Hugging Face folder `path`; `rope` replaces the
    checkpoint's RoPE (see with_rope)."""
    folder = Path(path)
    cfg = with_rope(config_from_hf(folder), rope)
    files = _weight_files(folder)
    with torch.device("meta"):
        model = Llama(cfg)
    mapping = _check_weights(files, model)
    from safetensors import safe_open

    state = {}
    by_file: dict[Path, list[str]] = {}
    for ours, hf_name in mapping.items():
        by_file.setdefault(files[hf_name], []).append(ours)
    for file, ours_names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for ours in ours_names:
                state[ours] = f.get_tensor(mapping[ours]).to(dtype)
    return assign_weights(model, state, str(folder))


def save_pretrained(model: Llama, path: str | Path, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write config.json and the weights (one model.safetensors, or shards and an index when
    they exceed max_shard_bytes) in the Hugging Face layout."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    names = hf_names(model.cfg)
    tensors = {names[ours]: t.detach().cpu().contiguous() for ours, t in _model_state(model).items()}
    dtype = next(iter(tensors.values())).dtype
    (folder / CONFIG_FILE).write_text(json.dumps(config_to_hf(model.cfg, dtype), indent=2))
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / WEIGHTS_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ---- the training run's model -------------------------------------------------------------
def resolve_config(cfg: LlamaConfig, data_vocab: int, data_name: str) -> LlamaConfig:
    """The model config a run builds.  model.path set (model=hf): shape, vocabulary and RoPE
    from its config.json, a `model.rope` of another type than `checkpoint` replacing the RoPE
    (with_rope); otherwise `cfg` with vocab_size from the data.  Raises when the data's token
    ids do not fit the embedding."""
    if cfg.path:
        resolved = with_rope(config_from_hf(cfg.path), cfg.rope)
        where = f"model.path={cfg.path!r} ({CONFIG_FILE}: vocab_size={resolved.vocab_size})"
    else:
        resolved = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or data_vocab)
        where = f"model.vocab_size={resolved.vocab_size}"
    if resolved.vocab_size < data_vocab:
        raise ValueError(f"the data's tokenizer ({data_name}: {data_vocab} ids, end-of-document included) does not "
                         f"fit the embedding of {where}; prepare the data with the model's tokenizer.json and its "
                         f"--eos-token, or raise the vocabulary")
    return resolved


def build_model(cfg: LlamaConfig) -> Llama:
    """A resolved config's model: the checkpoint's weights (model=hf) or a fresh init."""
    return from_pretrained(cfg.path, rope=cfg.rope) if cfg.path else Llama(cfg)
