"""HF checkpoint import/export: `config.json` + single or index-sharded `*.safetensors`.

Checkpoints are read from a local directory or a Hugging Face Hub id (`Qwen/Qwen2.5-0.5B-Instruct`,
fetched into the HF cache: `steppo_jax.hub.resolve_hf_path`).

Tensors are read through a memory map; with a mesh, each device receives only its own shard
(`jax.make_array_from_callback`), so a model never sits whole on one device while loading.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from steppo_jax import sharding
from steppo_jax.hub import resolve_hf_path
from steppo_jax.models.config import ModelConfig
from steppo_jax.models.decoder import Decoder

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _param_map(cfg: ModelConfig) -> dict[tuple, tuple[str, Callable, Callable]]:
    """Our state path -> (HF tensor name, hf_to_ours, ours_to_hf) on numpy arrays.

    Layer parameters are stacked ([L, ...] under path ("layers", ...)); their HF name holds
    a ``{i}`` for the layer index and the conversions act on one layer.
    """
    d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    same = (lambda x: x, lambda x: x)
    tr = (lambda x: x.T, lambda x: x.T)

    def proj_in(n):  # HF [n*hd, D] <-> ours [D, n, hd]
        return (lambda x: x.T.reshape(d, n, hd), lambda x: x.reshape(d, n * hd).T)

    def bias_in(n):
        return (lambda x: x.reshape(n, hd), lambda x: x.reshape(n * hd))

    o = (lambda x: x.T.reshape(h, hd, d), lambda x: x.reshape(h * hd, d).T)
    out = {("embed",): ("model.embed_tokens.weight", *same),
           ("norm", "weight"): ("model.norm.weight", *same)}
    if not cfg.tie_embeddings:
        out[("lm_head",)] = ("lm_head.weight", *tr)
    entries = {
        ("attn_norm", "weight"): ("input_layernorm.weight", *same),
        ("mlp_norm", "weight"): ("post_attention_layernorm.weight", *same),
        ("attn", "q"): ("self_attn.q_proj.weight", *proj_in(h)),
        ("attn", "k"): ("self_attn.k_proj.weight", *proj_in(k)),
        ("attn", "v"): ("self_attn.v_proj.weight", *proj_in(k)),
        ("attn", "o"): ("self_attn.o_proj.weight", *o),
        ("mlp", "gate"): ("mlp.gate_proj.weight", *tr),
        ("mlp", "up"): ("mlp.up_proj.weight", *tr),
        ("mlp", "down"): ("mlp.down_proj.weight", *tr),
    }
    if cfg.qkv_bias:
        entries[("attn", "q_bias")] = ("self_attn.q_proj.bias", *bias_in(h))
        entries[("attn", "k_bias")] = ("self_attn.k_proj.bias", *bias_in(k))
        entries[("attn", "v_bias")] = ("self_attn.v_proj.bias", *bias_in(k))
    if cfg.o_bias:
        entries[("attn", "o_bias")] = ("self_attn.o_proj.bias", *same)
    if cfg.qk_norm:
        entries[("attn", "q_norm", "weight")] = ("self_attn.q_norm.weight", *same)
        entries[("attn", "k_norm", "weight")] = ("self_attn.k_norm.weight", *same)
    if cfg.mlp_bias:
        for name in ("gate", "up", "down"):
            entries[("mlp", f"{name}_bias")] = (f"mlp.{name}_proj.bias", *same)
    for path, (name, f, g) in entries.items():
        out[("layers",) + path] = ("model.layers.{i}." + name, f, g)
    return out


# -- safetensors (read through mmap, written without torch) ---------------------------------------
def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _open_tensors(directory: str) -> dict[str, Callable[[], np.ndarray]]:
    """HF tensor name -> loader returning a (memory-mapped) numpy array."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file (or model.safetensors.index.json) in {directory}")
    tensors = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint shard listed in the index is missing: {path}")
        header, start = _read_header(path)
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        for key, info in header.items():
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(f"tensor {key!r} in {path}: unsupported dtype {info['dtype']}")
            lo, hi = info["data_offsets"]

            def load(lo=lo, hi=hi, info=info, mm=mm, start=start):
                raw = mm[start + lo:start + hi]
                return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])

            tensors[key] = load
    return tensors


def _write_safetensors(path: str, arrays: dict[str, np.ndarray]) -> None:
    header, offset = {}, 0
    for key, arr in arrays.items():
        header[key] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays.values():
            f.write(np.ascontiguousarray(arr).tobytes())


# -- public API ----------------------------------------------------------------------------------
def read_hf_config(path: str, dtype: str | None = None, *, compute_dtype: str | None = None,
                   **options) -> ModelConfig:
    """The `ModelConfig` of HF checkpoint directory (or hub id) `path` from its `config.json` alone
    (of a hub id, only `config.json` is fetched).

    dtype: parameter dtype (default: the checkpoint's); compute_dtype: activation dtype (default:
    dtype); options: other ModelConfig fields (attention, attention_block, remat).
    Raises FileNotFoundError naming the missing directory or file, `HubError` for a hub id that
    cannot be fetched.
    """
    path = resolve_hf_path(path, files=("config.json",))
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"config.json not found in {path}")
    with open(cfg_path) as f:
        config = ModelConfig.from_hf(json.load(f), param_dtype=dtype, dtype=compute_dtype or dtype)
    return config.replace(**options)


def load_hf_checkpoint(path: str, dtype: str | None = None, *, compute_dtype: str | None = None,
                       mesh: jax.sharding.Mesh | None = None, **options) -> tuple[Decoder, ModelConfig]:
    """Reads an HF Llama/Qwen2/Qwen3 checkpoint (a local directory or a hub id) into a `Decoder`.

    dtype: parameter dtype ('float32', 'bfloat16'; default: the checkpoint's). compute_dtype:
    activation dtype (default: dtype). mesh: place each parameter directly in its sharding.
    options: other ModelConfig fields (attention, attention_block, remat).
    Raises FileNotFoundError (missing directory/config/weights), ValueError (unsupported
    architecture, a tensor's shape mismatch or an unexpected tensor, named; `HubError`, a hub id
    that cannot be fetched), KeyError (missing tensor, named).
    """
    path = resolve_hf_path(path)
    config = read_hf_config(path, dtype, compute_dtype=compute_dtype, **options)
    tensors = _open_tensors(path)
    mapping = _param_map(config)

    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = sharding.state_shardings(state, mesh) if mesh is not None else None
    flat = dict(nnx.to_flat_state(state))
    flat_shardings = dict(nnx.to_flat_state(shardings)) if mesh is not None else {}
    used = set()
    for path_, var in flat.items():
        template, to_ours, _ = mapping[path_]
        want = var.get_value()
        layers = range(config.n_layers) if path_[0] == "layers" else [None]
        host = []
        for i in layers:
            name = template.format(i=i)
            if name not in tensors:
                raise KeyError(f"tensor {name!r} missing from checkpoint {path}")
            used.add(name)
            host.append(_converted(tensors[name], to_ours, name, want.shape[1:] if i is not None else want.shape))
        var.set_value(_place(host if path_[0] == "layers" else host[0], want.dtype, flat_shardings.get(path_)))
    extra = [n for n in tensors if n not in used and not n.endswith(_IGNORED_SUFFIXES)
             and not (config.tie_embeddings and n == "lm_head.weight")]
    if extra:
        raise ValueError(f"unexpected tensors in checkpoint {path}: {sorted(extra)[:8]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), config


def _converted(load: Callable[[], np.ndarray], to_ours: Callable, name: str, shape) -> Callable[[], np.ndarray]:
    """A loader of tensor ``name`` in our layout, its shape checked now (from the header)."""
    raw = load()
    try:
        ours = to_ours(raw)
    except ValueError:
        ours = raw
    if ours.shape != tuple(shape):
        raise ValueError(f"tensor {name!r}: checkpoint shape {tuple(raw.shape)} does not match "
                         f"the config (expects {tuple(shape)} in our layout)")
    return lambda: to_ours(load())


def _place(host, dtype, named_sharding) -> jax.Array:
    """A parameter from its loader (or, for stacked layers, the list of per-layer loaders),
    each device reading only its own shard."""
    def read(idx):
        if isinstance(host, list):  # stacked: idx[0] selects layers
            return np.stack([np.asarray(f()[idx[1:]]) for f in host[idx[0]]]).astype(dtype)
        return np.asarray(host()[idx]).astype(dtype)

    full = (slice(None),) * 8
    shape = (len(host), *host[0]().shape) if isinstance(host, list) else host().shape
    if named_sharding is None:
        return jnp.asarray(read(full[:len(shape)]))
    s = named_sharding.get_value() if isinstance(named_sharding, nnx.Variable) else named_sharding
    return jax.make_array_from_callback(shape, s, read)


def save_hf_checkpoint(model: Decoder, path: str) -> None:
    """Writes `config.json` + `model.safetensors` that transformers' *ForCausalLM loads."""
    cfg = model.config
    os.makedirs(path, exist_ok=True)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    arrays = {}
    for path_, (template, _, to_hf) in _param_map(cfg).items():
        if path_ not in flat:
            raise KeyError(f"model has no parameter {path_} (for {template!r})")
        value = np.asarray(jax.device_get(flat[path_].get_value()))
        if path_[0] == "layers":
            for i in range(cfg.n_layers):
                arrays[template.format(i=i)] = np.ascontiguousarray(to_hf(value[i]))
        else:
            arrays[template] = np.ascontiguousarray(to_hf(value))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
    _write_safetensors(os.path.join(path, "model.safetensors"), arrays)
