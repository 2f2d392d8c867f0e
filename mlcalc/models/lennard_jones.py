"""Lennard-Jones pair potential in torch: the exact oracle for the calculator core (vs ase's LennardJones)."""

from __future__ import annotations

import torch
from torch import Tensor

from mlcalc.graph import AtomGraph
from mlcalc.models.base import MLModel, register_model
from mlcalc.nn.scatter import scatter_sum


@register_model("lennard_jones", "LennardJones", "lj")
class LennardJones(MLModel):
    """Lennard-Jones potential ``4 eps ((sigma/r)^12 - (sigma/r)^6)`` with ase's cut-off conventions.

    Args:
        sigma: length scale, Å (minimum at 2^(1/6) sigma).
        epsilon: well depth, eV.
        rc: cut-off radius, Å (default 3 sigma).
        ro: onset of the smooth cut-off function, Å (default 0.66 rc).
        smooth: True multiplies the pair energy by ase's C¹ cut-off function between ro and rc (ase
            ``LennardJones(smooth=True)``); False shifts it to zero at rc (ase's default).

    Forces and stress are gradients (computed by the calculator through autograd). Every element is accepted.
    """

    direct_forces = False

    def __init__(
        self,
        sigma: float = 1.0,
        epsilon: float = 1.0,
        rc: float | None = None,
        ro: float | None = None,
        smooth: bool = True,
    ) -> None:
        super().__init__()
        if sigma <= 0 or epsilon < 0:
            raise ValueError(f"need sigma > 0 and epsilon >= 0, got sigma={sigma}, epsilon={epsilon}")
        rc = 3.0 * sigma if rc is None else float(rc)
        ro = 0.66 * rc if ro is None else float(ro)
        if not 0 < ro < rc:
            raise ValueError(f"need 0 < ro < rc, got ro={ro}, rc={rc}")
        self.capture_hparams(dict(sigma=sigma, epsilon=epsilon, rc=rc, ro=ro, smooth=smooth))
        self.sigma, self.epsilon, self.rc, self.ro, self.smooth = float(sigma), float(epsilon), rc, ro, smooth
        self.cutoff = rc
        self.max_neighbors = None

    def forward(self, graph: AtomGraph) -> dict[str, Tensor]:
        """Energy per structure (B,), eV."""
        vec = graph.edge_vectors()
        r2 = (vec * vec).sum(dim=1)
        c6 = (self.sigma**2 / r2) ** 3
        pair = 4.0 * self.epsilon * (c6 * c6 - c6)
        rc2, ro2 = self.rc**2, self.ro**2
        if self.smooth:
            fc = torch.where(
                r2 < ro2,
                torch.ones_like(r2),
                torch.where(r2 < rc2, (rc2 - r2) ** 2 * (rc2 + 2 * r2 - 3 * ro2) / (rc2 - ro2) ** 3, 0.0 * r2),
            )
            pair = pair * fc
        else:
            e0 = 4.0 * self.epsilon * ((self.sigma / self.rc) ** 12 - (self.sigma / self.rc) ** 6)
            pair = torch.where(r2 <= rc2, pair - e0, torch.zeros_like(pair))
        atom_energy = 0.5 * scatter_sum(pair, graph.edge_index[1], graph.num_atoms)
        return {"energy": scatter_sum(atom_energy, graph.batch, graph.num_graphs)}
