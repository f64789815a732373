"""A PoinTr-style geometry-aware transformer for point-cloud completion; every attention a zoo member.

Reference: Yu, Rao, Wang, Liu, Lu, Zhou, "PoinTr: Diverse Point Cloud Completion with
Geometry-Aware Transformers", ICCV 2021 (``models/PoinTr.py``, ``models/Transformer.py``).
The pipeline is PoinTr's:

1. point proxies: farthest-point-sampled centres of the partial cloud, each with a feature of its
   k-nearest-neighbour patch and a position embedding of its coordinates;
2. a transformer encoder over the proxies (self attention, role ``encoder_self``), geometry-aware:
   beside attention, a block max-pools kNN graph features of its neighbour proxies (PoinTr's
   ``knn_map``/``merge_map``), in the first ``geometry_layers`` blocks;
3. queries: a global feature (max-pool of the encoder output) predicts ``queries`` coarse centres;
   each query's feature is an MLP of the global feature and its coarse centre;
4. a query decoder (self attention ``decoder_self``, then cross attention to the encoder output
   ``cross``; geometry-aware in its first blocks, with kNN among queries and from queries to
   proxies);
5. a folding head: each query folds a ``fold_step`` x ``fold_step`` 2-D grid into offsets
   around its coarse centre (FoldingNet's two folds).

The output is PoinTr's: the coarse cloud is the predicted centres plus FPS centres of the
input, the dense cloud is the folded points plus the input itself; training minimises
CD-L1(coarse, gt) + CD-L1(dense, gt).

Simplified, as said here so nobody mistakes it for the paper's model:

- proxy features come from a two-stage mini-PointNet over each centre's kNN patch (as in
  Point-BERT/AdaPoinTr), not from PoinTr's DGCNN grouper (four EdgeConv layers with FPS
  2048 -> 512 -> 128);
- pre-norm residual blocks without DropPath; a plain LayerNorm/MLP query generator;
- the default sizes are a smoke scale (see ``PointCloudConfig``); PoinTr/PCN uses 128 proxies,
  width 384, 6 heads, 6 encoder and 8 decoder blocks, 224 queries and an 8 x 8 fold (14336 + 2048
  output points), 2048 input points;
- no mirror augmentation during training.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attention_zoo import MultiHeadAttention, Pattern
from tasks.point_cloud.geometry import chamfer_l1, farthest_point_sample, gather_points, knn

ROLES: dict[str, Pattern] = {
    "encoder_self": Pattern.NONCAUSAL_SELF,
    "decoder_self": Pattern.NONCAUSAL_SELF,
    "cross": Pattern.NONCAUSAL_CROSS,
}


@dataclass(frozen=True)
class PoinTrSettings:
    """Sizes of the network (PoinTr's PCN values in brackets)."""

    centres: int = 32  # [128]
    neighbours: int = 16  # points per proxy patch [16]
    dim: int = 64  # [384]
    heads: int = 4  # [6]
    encoder_depth: int = 2  # [6]
    decoder_depth: int = 2  # [8]
    queries: int = 32  # [224]
    fold_step: int = 4  # [8]
    geometry_layers: int = 1  # [1]
    geometry_neighbours: int = 8  # [8]
    mlp_ratio: float = 2.0  # [4]
    attention: Mapping[str, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)


def _mlp(*widths: int, last_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2 or last_activation:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class PatchEncoder(nn.Module):
    """A two-stage mini-PointNet: local patch [B, C, k, 3] (centred) -> feature [B, C, E]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.first = _mlp(3, 32, 64)
        self.second = _mlp(128, 128, dim)

    def forward(self, patches: Tensor) -> Tensor:
        local = self.first(patches)  # [B, C, k, 64]
        pooled = local.max(dim=2, keepdim=True).values.expand_as(local)
        return self.second(torch.cat([pooled, local], dim=-1)).max(dim=2).values  # [B, C, E]


class GraphFeature(nn.Module):
    """PoinTr's kNN branch: max over neighbours of Linear([f_j - f_i, f_i]) -> [B, M, E]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.edge = nn.Sequential(nn.Linear(2 * dim, dim), nn.LeakyReLU(0.2))

    def forward(self, query: Tensor, key: Tensor, index: Tensor) -> Tensor:
        # query [B, M, E], key [B, N, E], index [B, M, k] into key
        neighbours = gather_points(key, index)  # [B, M, k, E]
        centre = query.unsqueeze(2).expand_as(neighbours)
        return self.edge(torch.cat([neighbours - centre, centre], dim=-1)).max(dim=2).values


class EncoderBlock(nn.Module):
    """Pre-norm self attention (optionally geometry-aware) and MLP over proxies [B, C, E]."""

    def __init__(self, dim: int, heads: int, attention: tuple[str, Mapping[str, Any]], mlp_ratio: float,
                 geometric: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, attention[0], pattern=Pattern.NONCAUSAL_SELF,
                                       attention_args=attention[1])
        self.graph = GraphFeature(dim) if geometric else None
        self.merge = nn.Linear(2 * dim, dim) if geometric else None
        self.mlp = _mlp(dim, int(dim * mlp_ratio), dim)

    def forward(self, x: Tensor, neighbours: Tensor) -> Tensor:
        normed = self.norm1(x)
        update = self.attn(normed)
        if self.graph is not None:
            update = self.merge(torch.cat([update, self.graph(normed, normed, neighbours)], dim=-1))
        x = x + update
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Query self attention, cross attention to the proxies, MLP; queries [B, Q, E]."""

    def __init__(self, dim: int, heads: int, self_attention: tuple[str, Mapping[str, Any]],
                 cross_attention: tuple[str, Mapping[str, Any]], mlp_ratio: float, geometric: bool) -> None:
        super().__init__()
        self.norm1, self.norm_q, self.norm_kv, self.norm2 = (nn.LayerNorm(dim) for _ in range(4))
        self.self_attn = MultiHeadAttention(dim, heads, self_attention[0], pattern=Pattern.NONCAUSAL_SELF,
                                            attention_args=self_attention[1])
        self.cross_attn = MultiHeadAttention(dim, heads, cross_attention[0], pattern=Pattern.NONCAUSAL_CROSS,
                                             attention_args=cross_attention[1])
        self.geometric = geometric
        if geometric:
            self.self_graph, self.cross_graph = GraphFeature(dim), GraphFeature(dim)
            self.self_merge, self.cross_merge = nn.Linear(2 * dim, dim), nn.Linear(2 * dim, dim)
        self.mlp = _mlp(dim, int(dim * mlp_ratio), dim)

    def forward(self, q: Tensor, memory: Tensor, self_neighbours: Tensor, cross_neighbours: Tensor) -> Tensor:
        normed = self.norm1(q)
        update = self.self_attn(normed)
        if self.geometric:
            local = self.self_graph(normed, normed, self_neighbours)
            update = self.self_merge(torch.cat([update, local], -1))
        q = q + update
        normed, memory = self.norm_q(q), self.norm_kv(memory)
        update = self.cross_attn(normed, memory, memory)
        if self.geometric:
            local = self.cross_graph(normed, memory, cross_neighbours)
            update = self.cross_merge(torch.cat([update, local], -1))
        q = q + update
        return q + self.mlp(self.norm2(q))


class Folding(nn.Module):
    """FoldingNet's two folds: feature [N, F] and a step x step grid -> offsets [N, step^2, 3]."""

    def __init__(self, in_dim: int, step: int, hidden: int = 128) -> None:
        super().__init__()
        line = torch.linspace(-1.0, 1.0, step)
        grid = torch.stack(torch.meshgrid(line, line, indexing="ij"), dim=-1).reshape(-1, 2)
        self.register_buffer("grid", grid, persistent=False)  # [S, 2]
        self.fold1 = _mlp(in_dim + 2, hidden, hidden // 2, 3)
        self.fold2 = _mlp(in_dim + 3, hidden, hidden // 2, 3)

    def forward(self, feature: Tensor) -> Tensor:
        count, steps = feature.shape[0], self.grid.shape[0]
        expanded = feature.unsqueeze(1).expand(-1, steps, -1)  # [N, S, F]
        first = self.fold1(torch.cat([self.grid.expand(count, -1, -1), expanded], dim=-1))
        return self.fold2(torch.cat([first, expanded], dim=-1))  # [N, S, 3]


class PoinTr(nn.Module):
    """Partial cloud [B, N, 3] -> (coarse [B, Q + Q, 3], dense [B, Q * S + N, 3]).

    Args:
        settings: network sizes and the mechanism per role (``{role: (name, args)}``; roles
            missing from it use softmax).
        backend: geometry backend ("auto", "torch", "pytorch3d").
    """

    def __init__(self, settings: PoinTrSettings, *, backend: str = "auto") -> None:
        super().__init__()
        s = settings
        unknown = sorted(set(s.attention) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown attention roles {unknown}; valid: {', '.join(ROLES)}")
        choice = {role: s.attention.get(role, ("softmax", {})) for role in ROLES}
        self.settings, self.backend = s, backend
        self.patch_encoder = PatchEncoder(s.dim)
        self.position = _mlp(3, 128, s.dim)
        self.encoder = nn.ModuleList(
            EncoderBlock(s.dim, s.heads, choice["encoder_self"], s.mlp_ratio, i < s.geometry_layers)
            for i in range(s.encoder_depth))
        self.global_feature = _mlp(s.dim, 4 * s.dim)
        self.coarse = _mlp(4 * s.dim, 4 * s.dim, 3 * s.queries)
        self.query_feature = nn.Sequential(_mlp(4 * s.dim + 3, 4 * s.dim, s.dim), nn.LayerNorm(s.dim))
        self.decoder = nn.ModuleList(
            DecoderBlock(s.dim, s.heads, choice["decoder_self"], choice["cross"], s.mlp_ratio,
                         i < s.geometry_layers)
            for i in range(s.decoder_depth))
        self.query_global = _mlp(s.dim, 4 * s.dim)
        self.reduce = nn.Linear(4 * s.dim + s.dim + 3, s.dim)
        self.folding = Folding(s.dim, s.fold_step)

    def forward(self, partial: Tensor) -> tuple[Tensor, Tensor]:
        s, backend = self.settings, self.backend
        batch = partial.shape[0]
        centre_index = farthest_point_sample(partial, s.centres, backend=backend)  # [B, C]
        centres = gather_points(partial, centre_index)  # [B, C, 3]
        patch_index = knn(centres, partial, s.neighbours, backend=backend)[1]  # [B, C, k]
        patches = gather_points(partial, patch_index) - centres.unsqueeze(2)  # [B, C, k, 3]
        position = self.position(centres)
        x = self.patch_encoder(patches)  # [B, C, E]
        geometry_k = min(s.geometry_neighbours, s.centres)
        proxy_neighbours = knn(centres, centres, geometry_k, backend=backend)[1]
        for block in self.encoder:
            x = block(x + position, proxy_neighbours)
        pooled = self.global_feature(x).max(dim=1).values  # [B, 4E]
        coarse = self.coarse(pooled).view(batch, s.queries, 3)  # [B, Q, 3]
        q = self.query_feature(torch.cat([pooled.unsqueeze(1).expand(-1, s.queries, -1), coarse], dim=-1))
        anchors = coarse.detach()  # kNN graphs are built on positions, not differentiated
        query_neighbours = knn(anchors, anchors, min(s.geometry_neighbours, s.queries), backend=backend)[1]
        cross_neighbours = knn(anchors, centres, geometry_k, backend=backend)[1]
        for block in self.decoder:
            q = block(q, x, query_neighbours, cross_neighbours)
        query_pooled = self.query_global(q).max(dim=1).values  # [B, 4E]
        feature = self.reduce(torch.cat([query_pooled.unsqueeze(1).expand(-1, s.queries, -1), q, coarse], -1))
        offsets = self.folding(feature.reshape(batch * s.queries, s.dim))  # [B*Q, S, 3]
        dense = (offsets.view(batch, s.queries, -1, 3) + coarse.unsqueeze(2)).reshape(batch, -1, 3)
        input_centres = gather_points(partial, farthest_point_sample(partial, s.queries, backend=backend))
        return torch.cat([coarse, input_centres], dim=1), torch.cat([dense, partial], dim=1)

    def loss(self, partial: Tensor, complete: Tensor) -> Tensor:
        """PoinTr's PCN objective: CD-L1(coarse, gt) + CD-L1(dense, gt), batch mean."""
        coarse, dense = self(partial)
        return (chamfer_l1(coarse, complete, backend=self.backend)
                + chamfer_l1(dense, complete, backend=self.backend)).mean()
