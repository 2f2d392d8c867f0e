"""Writes checkpoints/lj_argon.pt: Lennard-Jones argon (sigma 3.40 Å, epsilon 0.0104 eV, rc 8.5 Å) in mlcalc format.

Parameters: the classic argon values (Rahman, Phys. Rev. 136, A405 (1964): sigma = 3.4 Å, epsilon/k_B = 120 K).
"""

from pathlib import Path

from mlcalc import save_model
from mlcalc.models import LennardJones

if __name__ == "__main__":
    model = LennardJones(sigma=3.40, epsilon=120 * 8.617333262e-5, rc=8.5, ro=7.0)
    save_model(model, Path(__file__).with_name("lj_argon.pt"), elements=["Ar"],
               training_data="analytic (Rahman 1964 argon parameters)")
