"""Every random stream is derived from (seed, round, client, ...), never from history.

That is what makes a run independent of the number of ranks (any rank can train any client
and draw the same numbers) and of crashes (a resumed round replays exactly).
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


# Tags that keep streams apart when the other parts coincide.
INIT, CLIENT, SOBOL, SHUFFLE, SAMPLE, SELECT, DP_NOISE, DP_SAMPLING, AUDIT = range(9)


def generator(device: torch.device | str, *parts: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def sobol_engine(*parts: int) -> torch.quasirandom.SobolEngine:
    """Scrambled 1-D Sobol sequence for noise levels: low-discrepancy t lowers loss variance."""
    return torch.quasirandom.SobolEngine(1, scramble=True, seed=derive_seed(SOBOL, *parts) % (2**31))
