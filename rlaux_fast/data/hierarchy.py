"""The class hierarchy: primary class c owns a block of psi[c] auxiliary classes.

Auxiliary classes are numbered block after block: primary c owns the aux indices
block_start[c] .. block_start[c] + block_size[c] - 1, and num_aux = sum(psi).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from rlaux_fast.errors import DataError


@dataclass(frozen=True)
class Hierarchy:
    psi: tuple[int, ...]
    num_primary: int = field(init=False)
    num_aux: int = field(init=False)
    block_start: torch.Tensor = field(init=False, repr=False, compare=False)  # int64 [P], CPU
    block_size: torch.Tensor = field(init=False, repr=False, compare=False)  # int64 [P], CPU

    def __post_init__(self) -> None:
        try:
            psi = tuple(int(p) for p in self.psi)
        except (TypeError, ValueError):
            raise DataError(f"psi {self.psi!r} is not a list of integers: pass whole numbers >= 1") from None
        if any(p != q for p, q in zip(psi, self.psi)):
            raise DataError(f"psi {self.psi!r} is not a list of integers: pass whole numbers >= 1")
        if not psi:
            raise DataError("the hierarchy has no primary class: pass at least one psi value")
        bad = [(c, p) for c, p in enumerate(psi) if p < 1]
        if bad:
            c, p = bad[0]
            raise DataError(f"psi[{c}] = {p}: every primary class needs at least one auxiliary class (psi >= 1)")
        size = torch.tensor(psi, dtype=torch.int64)
        # Frozen dataclass: derived fields are written once here, never again.
        object.__setattr__(self, "psi", psi)
        object.__setattr__(self, "num_primary", len(psi))
        object.__setattr__(self, "num_aux", sum(psi))
        object.__setattr__(self, "block_size", size)
        object.__setattr__(self, "block_start", torch.cumsum(size, 0) - size)

    @classmethod
    def uniform(cls, num_primary: int, psi: int) -> Hierarchy:
        if int(num_primary) < 1:
            raise DataError(f"{num_primary} primary classes: a hierarchy needs at least one")
        return cls((psi,) * int(num_primary))

    @classmethod
    def from_fine_to_primary(cls, fine_to_primary: Sequence[int]) -> tuple[Hierarchy, torch.Tensor]:
        """Hierarchy whose psi[c] counts the fine classes of primary c, and the fine -> aux map.

        A fine class's aux index is block_start[its primary] + its rank (by fine id) inside
        that primary, so the human labels are one valid point of the aux label space.
        """
        f2p = torch.as_tensor(list(fine_to_primary), dtype=torch.int64)
        if f2p.numel() == 0 or int(f2p.min()) < 0:
            raise DataError("fine_to_primary must map every fine class to a primary class >= 0")
        psi = torch.bincount(f2p, minlength=int(f2p.max()) + 1)
        if int(psi.min()) == 0:
            c = int((psi == 0).nonzero()[0])
            raise DataError(f"primary class {c} has no fine class: every primary class needs at least one")
        hierarchy = cls(psi.tolist())
        # Stable sort by primary keeps fine ids ascending inside each block.
        order = torch.sort(f2p, stable=True).indices
        fine_to_aux = torch.empty_like(f2p)
        fine_to_aux[order] = torch.arange(f2p.numel())
        return hierarchy, fine_to_aux

    def blocks(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_start, block_size) on `device`."""
        return self.block_start.to(device), self.block_size.to(device)

    def block_mask(self, primary_labels: torch.Tensor) -> torch.Tensor:
        """bool [B, A]: True on the aux classes inside each example's primary block."""
        start, size = self.blocks(primary_labels.device)
        start, size = start[primary_labels, None], size[primary_labels, None]
        aux = torch.arange(self.num_aux, device=primary_labels.device)
        return (aux >= start) & (aux < start + size)
