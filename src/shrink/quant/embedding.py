"""QuantEmbedding: an `nn.Embedding` whose table is stored as QuantLinear stores a weight.

Row i of the table is packed like output row i of a Linear layer (groups along the embedding
dimension), so a tied output layer can be a QuantLinear over the very same buffers: quantized once,
kept tied. A lookup gathers the packed rows of the ids and dequantizes only those.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import kernels
from .linear import PackedRows, QuantLinear, apply_keeping_dtypes
from .format import grid_levels
from .rtn import quantize_weight
from .spec import QuantSpec, parse_format


class QuantEmbedding(PackedRows):
    """Embedding table in an integer format (buffers qweight, scales, zeros as QuantLinear's); same
    forward as `nn.Embedding` (float32 rows out). Inference only."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec | str, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._register_packed(num_embeddings, embedding_dim, parse_format(spec))

    input_order = None  # rows hold their inputs in order, as a QuantLinear without input_order does

    @property
    def in_features(self) -> int:
        """The embedding dimension (a row's length), as for the Linear layer a tied output layer is."""
        return self.embedding_dim

    @property
    def out_features(self) -> int:
        """The number of rows."""
        return self.num_embeddings

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, spec: QuantSpec | str, name: str = "<embedding>") -> "QuantEmbedding":
        """Quantize an `nn.Embedding` by round-to-nearest, row by row (`name` is used in error messages)."""
        spec = parse_format(spec)
        q = quantize_weight(emb.weight, spec, name)
        layer = cls(emb.num_embeddings, emb.embedding_dim, spec, emb.padding_idx)
        layer.fill(q)
        return layer

    def tied_output(self, bias: torch.Tensor | None = None, backend: str | None = None) -> QuantLinear:
        """A QuantLinear computing x @ table.T over this table's own buffers (a tied output layer)."""
        head = QuantLinear(self.embedding_dim, self.num_embeddings, self.spec, bias=bias is not None, backend=backend)
        share_buffers(head, self)
        if bias is not None:
            head.bias.copy_(bias.detach().float())
        return head

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 table these codes stand for."""
        return kernels.reference.dequant_weight(self.qweight, self.scales, self.zeros, self.zero_const,
                                                self.spec.bits, self.embedding_dim, grid_levels(self.spec),
                                                self.superscales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ids.reshape(-1)
        zeros = self.zeros.index_select(0, rows) if self.zeros is not None else None
        sup = self.superscales.index_select(0, rows) if self.superscales is not None else None
        w = kernels.reference.dequant_weight(self.qweight.index_select(0, rows), self.scales.index_select(0, rows),
                                             zeros, self.zero_const, self.spec.bits, self.embedding_dim,
                                             grid_levels(self.spec), sup)
        return w.reshape(*ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtypes(self, fn, ("scales", "superscales"), recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.spec.name}"


def share_buffers(head: QuantLinear, table: QuantEmbedding) -> None:
    """Make `head` use `table`'s packed buffers (one copy in memory and on disk)."""
    head.qweight  # noqa: B018  (a head holding the tiled layout puts its row form back first)
    for key in ("qweight", "scales", "zeros", "superscales"):
        if getattr(table, key) is not None:
            head._buffers[key] = table._buffers[key]
    head.shares_buffers = True  # so the head never lets go of the row form the table reads rows from
