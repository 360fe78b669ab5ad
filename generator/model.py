"""The adapter generator (hypernetwork): hidden states of a context -> a low-rank adapter.

The paper's math (docs/design.md), per decoder layer and target module:
    Hn = RMSNorm(H)                 H: (b, n, d) input of the decoder layer, padding rows zeroed
    S  = (Hn A2^T)^T (Hn A3^T)      (b, d_r, d_r), summed over tokens and over windows
    S ~ U diag(s) V^T               rank r, singular values dropped (directions past the
                                    numerical rank of S zeroed: a context shorter than r)
    lora_A = U^T A1                 (b, r, d_in)
    lora_B = alpha/d_r * B V        (b, d_out, r)
"""

from __future__ import annotations

import threading
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generator.config import GeneratorConfig

LoRAFactors = dict[str, tuple[Tensor, Tensor]]  # module name -> (lora_A, lora_B)
State = dict[str, Tensor]  # module name -> S, (d_r, d_r) or (b, d_r, d_r)

SVD_SEED = 0  # svd_lowrank is randomized; a fixed seed makes adapters bit-reproducible
# Singular values below this fraction of the largest are float32 rounding (~1e-7 measured),
# not context (>= 5e-3 measured on 64- to 1,000-token contexts).
RANK_RTOL = 1e-4
_GLOBAL_RNG = threading.Lock()


class ModuleGenerator(nn.Module):
    """Trainable parameters for one target module of one decoder layer."""

    def __init__(self, hidden: int, d_in: int, d_out: int, inner: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(hidden))
        self.A1 = nn.Parameter(torch.empty(inner, d_in))
        self.A2 = nn.Parameter(torch.empty(inner, hidden))
        self.A3 = nn.Parameter(torch.empty(inner, hidden))
        self.B = nn.Parameter(torch.zeros(d_out, inner))  # zero: the first adapter is exactly zero
        for a in (self.A1, self.A2, self.A3):
            nn.init.kaiming_normal_(a)

    def state(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """S = K^T V over the tokens of h (b, n, d); mask (b, n) zeroes padding rows. The RMSNorm
        is folded: its weight into A2 and A3, its per-token scale (and the mask) applied to K
        and V, d_r wide, not to h, d wide (the same S; 1,024 tokens: 78 -> 61 ms, measured)."""
        h = h.to(self.A2.dtype)
        mean_square = torch.linalg.vector_norm(h, dim=-1, keepdim=True).square() / h.shape[-1]
        scale = torch.rsqrt(mean_square + self.eps)  # (b, n, 1)
        if mask is not None:
            scale = scale * mask.unsqueeze(-1).to(scale.dtype)
        weights = torch.cat([self.A2, self.A3]) * self.norm_weight  # (2 d_r, d)
        k, v = ((h @ weights.T) * scale).chunk(2, -1)  # (b, n, d_r) each
        return k.transpose(-1, -2) @ v  # (b, d_r, d_r)

    def lora(self, left: Tensor, right: Tensor | None, scaling: float) -> tuple[Tensor, Tensor]:
        """Fold a normalized S = left right^T (right None: the identity) into LoRA A
        (b, r', d_in) = left^T A1 and B (b, d_out, r') = scaling B right."""
        a = left.transpose(-1, -2) @ self.A1.float()
        b = scaling * self.B.float()
        return a, (b.expand(left.shape[0], -1, -1) if right is None else b @ right)


def _normalized(s: Tensor, config: GeneratorConfig) -> tuple[Tensor, Tensor | None]:
    """S (n, d_r, d_r) as left right^T: its top-r singular directions with unit singular values
    (SVD), or S over its Frobenius norm and the identity."""
    s = s.float()
    if config.normalization == "svd":
        return _svd_factors(s, config.rank)  # (n, d_r, r) each
    return s / (torch.linalg.matrix_norm(s, keepdim=True) + 1e-12), None


def _svd_factors(s: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """U, V of a rank-`rank` randomized SVD of each s in the batch, all in one batched call.
    Directions past the numerical rank of s (a context of fewer than `rank` tokens) are zero:
    they would be noise at full weight, and their gradients explode, so such an s is
    decomposed again at its own rank."""
    devices = [s.device] if s.device.type == "cuda" else []
    u, values, v = _seeded_svd_lowrank(s, rank, devices)
    ranks = (values > RANK_RTOL * values[:, :1]).sum(-1).clamp(min=1).tolist()
    if min(ranks) == rank:
        return u, v
    us, vs = list(u.unbind()), list(v.unbind())
    for i, q in enumerate(ranks):
        if q < rank:
            ui, _, vi = _seeded_svd_lowrank(s[i], q, devices)
            us[i], vs[i] = F.pad(ui, (0, rank - q)), F.pad(vi, (0, rank - q))
    return torch.stack(us), torch.stack(vs)


def _seeded_svd_lowrank(
    matrix: Tensor, q: int, devices: list[torch.device]
) -> tuple[Tensor, Tensor, Tensor]:
    """torch.svd_lowrank under SVD_SEED: its one random test matrix is shared by every matrix
    of a batch, so each gets the result it would get alone. It draws from torch's global
    generator, so one thread at a time: another thread seeding it mid-draw would change this
    adapter."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=devices):
        torch.manual_seed(SVD_SEED)
        return torch.svd_lowrank(matrix, q=q, niter=2)


class AdapterGenerator(nn.Module):
    """One ModuleGenerator per (decoder layer, target module); free of I/O."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    m: ModuleGenerator(c.hidden_size, d_in, d_out, c.inner_size, c.rms_norm_eps)
                    for m, (d_in, d_out) in c.modules.items()
                }
            )
            for _ in range(c.num_layers)
        )
        self.names = c.module_names()  # full names, in (layer, module) order

    def _generator(self, layer: int, module: str) -> ModuleGenerator:
        """self.layers[layer][module]: __init__ makes each layer a ModuleDict of ModuleGenerators,
        which nn.ModuleList and nn.ModuleDict type only as nn.Module."""
        return cast(ModuleGenerator, cast(nn.ModuleDict, self.layers[layer])[module])

    def _items(self) -> list[tuple[str, int, ModuleGenerator]]:
        per_layer = len(self.config.modules)
        return [
            (name, i // per_layer, self._generator(i // per_layer, name.rsplit(".", 1)[-1]))
            for i, name in enumerate(self.names)
        ]

    def state(self, hidden_states: list[Tensor] | tuple[Tensor, ...], mask: Tensor | None) -> State:
        """S for every module; hidden_states[l] is the input of decoder layer l."""
        return {name: gen.state(hidden_states[layer], mask) for name, layer, gen in self._items()}

    def lora(self, state: State) -> LoRAFactors:
        """Every module's factors; the normalizations of all modules and samples run as one
        batch (thirty small SVDs per sample would each pay their own overhead)."""
        items = self._items()
        s = torch.stack([state[name] for name, _, _ in items])  # (modules, b, d_r, d_r)
        left, right = _normalized(s.flatten(0, 1), self.config)
        lefts = left.unflatten(0, s.shape[:2])
        rights = None if right is None else right.unflatten(0, s.shape[:2])
        scaling = self.config.scaling
        return {
            name: gen.lora(lefts[i], None if rights is None else rights[i], scaling)
            for i, (name, _, gen) in enumerate(items)
        }


def add_states(a: State | None, b: State) -> State:
    """Chunks add up: S = S_1 + S_2 + ... (the pre-norm sum)."""
    return dict(b) if a is None else {k: a[k] + b[k] for k in b}
