"""An independent PyTorch (float64, CPU) implementation of the TokenFormer vision transformer.

It is written from DESIGN.md section 2 (the model) and section 5 (checkpoint names), not from our
C code, so that tests/test_torch_parity.py can hold the C implementation against it: logits, loss,
every parameter gradient and one AdamW step. It holds a small safetensors reader and writer (the
`safetensors` package is not installed on Debian), the model as plain functions over a dict of
named tensors (the names are the checkpoint names, so loading is a lookup and gradcheck can take
the tensors as inputs), the soft-target loss, zero-key growth (DESIGN.md section 4) and the
weight-decay rule. It runs under Debian's /usr/bin/python3 with torch 1.13 and numpy.
"""

import json
import math
import struct
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# ---- safetensors ------------------------------------------------------------------------------

# Little-endian numpy dtypes of the safetensors dtype names we may meet. BF16 has no numpy
# dtype; it is widened to float32 by hand in _decode_tensor.
_NUMPY_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}


def _decode_tensor(name: str, entry: dict, data: bytes, path: str) -> np.ndarray:
    dtype = entry.get("dtype")
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"{path}: tensor {name}: unsupported dtype {dtype!r}")
    shape = [int(s) for s in entry["shape"]]
    begin, end = (int(o) for o in entry["data_offsets"])
    np_dtype = np.dtype(_NUMPY_DTYPES[dtype])
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if not (0 <= begin <= end <= len(data)) or end - begin != numel * np_dtype.itemsize:
        raise ValueError(f"{path}: tensor {name}: data_offsets [{begin}, {end}] do not fit "
                         f"{numel} x {dtype} in a data section of {len(data)} bytes")
    array = np.frombuffer(data, dtype=np_dtype, count=numel, offset=begin).reshape(shape)
    if dtype == "BF16":  # bf16 is the top half of an f32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.copy()


def read_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Returns ({name: array}, metadata). Rejects a header or offsets that do not fit the file."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for a safetensors header length")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > len(raw) - 8:
        raise ValueError(f"{path}: header length {header_len} exceeds the file ({len(raw)} bytes)")
    header = json.loads(raw[8:8 + header_len].decode("utf-8"))
    data = raw[8 + header_len:]
    metadata = header.pop("__metadata__", None) or {}
    tensors = {name: _decode_tensor(name, entry, data, path) for name, entry in header.items()}
    return tensors, metadata


def write_safetensors(path: str, tensors: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    """Writes little-endian F32/F64 tensors; used by the self-tests to exercise the reader."""
    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        dtype = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}[array.dtype]
        blob = array.astype(_NUMPY_DTYPES[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        chunks.append(blob)
        offset += len(blob)
    header["__metadata__"] = metadata
    text = json.dumps(header).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as the library does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


# ---- configuration ----------------------------------------------------------------------------

PATTENTIONS = ("q", "k", "v", "o", "ffn")  # order of the five n_norm entries of a block


@dataclass
class ModelConfig:
    img_size: int
    patch: int
    channels: int
    depth: int
    dim: int
    heads: int
    n_attn: int
    n_ffn: int
    classes: int
    pool: str                  # "avg" (mean of patch tokens) or "cls" (token 0)
    drop_path: float
    eps: float                 # Pattention: Z = A sqrt(n_norm) / sqrt(sum A^2 + eps)
    layernorm_eps: float
    n_norm: List[List[int]]    # per block: q, k, v, o, ffn

    @property
    def patches(self) -> int:
        return (self.img_size // self.patch) ** 2

    @classmethod
    def from_metadata(cls, metadata: Dict[str, str]) -> "ModelConfig":
        """Builds the config from a checkpoint's __metadata__ ("format", "config")."""
        if metadata.get("format") != "tokenformer-vit":
            raise ValueError(f"metadata format is {metadata.get('format')!r}, not 'tokenformer-vit'")
        c = json.loads(metadata["config"])
        config = cls(**{field: c[field] for field in cls.__dataclass_fields__})
        if len(config.n_norm) != config.depth or any(len(row) != 5 for row in config.n_norm):
            raise ValueError(f"n_norm must be {config.depth} lists of 5, got {config.n_norm}")
        if config.pool not in ("avg", "cls") or config.dim % config.heads:
            raise ValueError(f"bad config: pool {config.pool!r}, dim {config.dim}, heads {config.heads}")
        return config

    def to_metadata(self, class_names: List[str]) -> Dict[str, str]:
        return {"format": "tokenformer-vit", "config": json.dumps(self.__dict__),
                "class_names": json.dumps(class_names)}


def pattention_prefix(block: int, which: str) -> str:
    return f"blocks.{block}.ffn" if which == "ffn" else f"blocks.{block}.attn.{which}"


def parameter_shapes(config: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every parameter of a freshly built model, by checkpoint name (DESIGN.md section 5)."""
    d, p = config.dim, config.patch
    shapes = {"patch_embed.proj.weight": (d, config.channels, p, p), "patch_embed.proj.bias": (d,),
              "cls_token": (1, 1, d), "pos_embed": (1, 1 + config.patches, d)}
    for block in range(config.depth):
        for which in PATTENTIONS:
            n = config.n_ffn if which == "ffn" else config.n_attn
            shapes[pattention_prefix(block, which) + ".key_tokens"] = (n, d)
            shapes[pattention_prefix(block, which) + ".value_tokens"] = (n, d)
    shapes.update({"fc_norm.weight": (d,), "fc_norm.bias": (d,),
                   "head.weight": (config.classes, d), "head.bias": (config.classes,)})
    return shapes


def no_weight_decay(name: str, shape: Tuple[int, ...]) -> bool:
    """DESIGN.md section 3: no decay on 1-D tensors, biases, norms, cls token, pos embedding."""
    return (len(shape) <= 1 or name.endswith(".bias") or "norm" in name
            or name in ("cls_token", "pos_embed"))


# ---- parameters -------------------------------------------------------------------------------

def init_parameters(config: ModelConfig, seed: int, dtype=torch.float64) -> Dict[str, torch.Tensor]:
    """Random parameters for the self-tests. Biases and fc_norm are randomised too (unlike the
    real init) so that a gradient that ignores them cannot hide behind zeros and ones."""
    generator = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in parameter_shapes(config).items():
        std = 0.5 if "value_tokens" in name or name.startswith("fc_norm") else 0.3
        tensor = torch.randn(shape, generator=generator, dtype=dtype) * std
        if name == "fc_norm.weight":
            tensor += 1.0
        params[name] = tensor.requires_grad_()
    return params


def load_checkpoint(path: str, dtype=torch.float64) -> Tuple[ModelConfig, Dict[str, torch.Tensor], dict]:
    """Reads our safetensors checkpoint: (config, {name: leaf tensor}, metadata). The model is
    built from the metadata alone; every expected tensor must be there, F32, with its shape, and
    nothing else may be."""
    arrays, metadata = read_safetensors(path)
    config = ModelConfig.from_metadata(metadata)
    expected = parameter_shapes(config)
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(f"{path}: missing tensors {missing}, unexpected tensors {extra}")
    params = {}
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != shape or arrays[name].dtype != np.float32:
            raise ValueError(f"{path}: {name} is {arrays[name].dtype} {list(arrays[name].shape)}, "
                             f"expected float32 {list(shape)}")
        params[name] = torch.from_numpy(arrays[name]).to(dtype).requires_grad_()
    return config, params, metadata


# ---- the model --------------------------------------------------------------------------------

def pattention(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n_norm: int,
               eps: float) -> torch.Tensor:
    """Token-parameter attention: A = X K^T; Z = A sqrt(n_norm) / sqrt(sum_j A_j^2 + eps);
    out = GELU(Z) V with the exact erf GELU. The norm uses the stored n_norm, not keys.shape[0],
    which is what makes zero-key growth preserve the function."""
    a = x @ keys.transpose(0, 1)
    z = a * math.sqrt(n_norm) / torch.sqrt((a * a).sum(dim=-1, keepdim=True) + eps)
    return F.gelu(z, approximate="none") @ values


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention over the tokens, not causal; head h owns columns [h hd, (h+1) hd)."""
    batch, tokens, dim = q.shape
    hd = dim // heads

    def split(t):  # [B, T, d] -> [B, heads, T, hd]
        return t.reshape(batch, tokens, heads, hd).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd)
    out = torch.softmax(scores, dim=-1) @ split(v)
    return out.transpose(1, 2).reshape(batch, tokens, dim)


def embed(params: Dict[str, torch.Tensor], config: ModelConfig, images: torch.Tensor) -> torch.Tensor:
    """Patches by a stride-p conv, flattened row-major, cls token first, plus pos_embed."""
    x = F.conv2d(images, params["patch_embed.proj.weight"], params["patch_embed.proj.bias"],
                 stride=config.patch)
    x = x.flatten(2).transpose(1, 2)  # [B, d, gh, gw] -> [B, gh gw, d], patch index r gw + c
    cls = params["cls_token"].expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1) + params["pos_embed"]


def block_forward(params: Dict[str, torch.Tensor], config: ModelConfig, block: int, x: torch.Tensor,
                  scale_attn: torch.Tensor, scale_ffn: torch.Tensor) -> torch.Tensor:
    """Pre-norm block with non-parametric LayerNorms; the drop-path scales ([B], 0 or 1/keep)
    multiply each residual branch per sample."""
    def patt(which, inp):
        prefix = pattention_prefix(block, which)
        return pattention(inp, params[prefix + ".key_tokens"], params[prefix + ".value_tokens"],
                          config.n_norm[block][PATTENTIONS.index(which)], config.eps)

    def norm(inp):
        return F.layer_norm(inp, (config.dim,), eps=config.layernorm_eps)

    y = norm(x)
    att = multi_head_attention(patt("q", y), patt("k", y), patt("v", y), config.heads)
    x = x + scale_attn[:, None, None] * patt("o", att)
    return x + scale_ffn[:, None, None] * patt("ffn", norm(x))


def head_forward(params: Dict[str, torch.Tensor], config: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    pooled = x[:, 1:].mean(dim=1) if config.pool == "avg" else x[:, 0]
    pooled = F.layer_norm(pooled, (config.dim,), params["fc_norm.weight"], params["fc_norm.bias"],
                          eps=config.layernorm_eps)
    return pooled @ params["head.weight"].transpose(0, 1) + params["head.bias"]


def forward(params: Dict[str, torch.Tensor], config: ModelConfig, images: torch.Tensor,
            drop_scales: torch.Tensor) -> torch.Tensor:
    """Logits [B, classes] of images [B, C, H, W]; drop_scales [depth, 2, B] (0: attention
    branch, 1: FFN branch). Pass all ones for evaluation."""
    x = embed(params, config, images)
    for block in range(config.depth):
        x = block_forward(params, config, block, x, drop_scales[block, 0], drop_scales[block, 1])
    return head_forward(params, config, x)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_b( -sum_c t[b, c] log_softmax(z_b)_c )."""
    return -(targets * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


# ---- growth by parameter tokens (DESIGN.md section 4) -----------------------------------------

def grow_tokens(params: Dict[str, torch.Tensor], config: ModelConfig, extra: int, value_std: float,
                follow_n_norm: bool, seed: int) -> Tuple[Dict[str, torch.Tensor], ModelConfig]:
    """Appends `extra` rows to K and V of every Pattention: zero keys and N(0, value_std) values.
    With follow_n_norm False n_norm is kept (exact, function-preserving); with True it becomes the
    new token count (the paper's runs), which changes the function."""
    generator = torch.Generator().manual_seed(seed)
    grown = {name: t.detach().clone() for name, t in params.items()}
    n_norm = [row[:] for row in config.n_norm]
    for block in range(config.depth):
        for index, which in enumerate(PATTENTIONS):
            prefix = pattention_prefix(block, which)
            keys, values = grown[prefix + ".key_tokens"], grown[prefix + ".value_tokens"]
            new_values = torch.randn((extra, values.shape[1]), generator=generator, dtype=values.dtype)
            grown[prefix + ".key_tokens"] = torch.cat([keys, keys.new_zeros((extra, keys.shape[1]))])
            grown[prefix + ".value_tokens"] = torch.cat([values, new_values * value_std])
            if follow_n_norm:
                n_norm[block][index] = keys.shape[0] + extra
    grown_config = ModelConfig(**{**config.__dict__, "n_norm": n_norm,
                                  "n_attn": config.n_attn + extra, "n_ffn": config.n_ffn + extra})
    return grown, grown_config
