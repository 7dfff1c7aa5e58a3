"""Privacy for fedrun: differential privacy, secure aggregation, and an audit of what a trained
generator leaks.

Units of differential privacy (``privacy.level``):

* ``"sample"``: every client trains with DP-SGD through Opacus (per-sample gradient clipping,
  Gaussian noise, Poisson sampling of its batches): one image (a patient) is protected, and
  each client has its own (epsilon, delta), tracked over every round it took part in.
* ``"sample_once"``: the image is the unit too, but a round is one DP-SGD step over every
  participating client's Poisson batch, the noise added once to the round's sum.
* ``"client"``: DP-FedAvg (McMahan et al., ICLR 2018): each client's update is clipped, noise is
  added once per round (by the server, or in shares by the clients): one whole client is protected.

Secure aggregation (``secure_agg.protocol = "secagg+"``) hides each client's contribution from the
aggregator; with ``secure_agg.bits > 0`` the noise of "sample_once" and "client" is added by the
clients on an integer grid (distributed DP), so that only the secure sum carries all of it.

Modules: ``base`` (a mechanism: the parts it wraps; ``Stack``), ``mechanisms`` (the DP levels),
``secure_sum`` (secure aggregation as a mechanism), ``secure_agg`` (SecAgg+ itself),
``distributed_dp`` (the grid: rotation, rounding, Skellam shares), ``skellam_accountant`` (its
RDP accountant), ``accountant`` (per-client ledgers over Opacus's RDP/PRV accountants, the planned
budget and its check), ``dp_sgd`` (DP-SGD local training; the clipped per-image gradients of
"sample_once"), ``client_dp`` (clipping, Poisson client sampling and the server's noise for
DP-FedAvg), ``audit`` (membership inference and memorisation: ``fedrun audit RUN_DIR``).

Opacus is a dependency imported only when DP-SGD runs (``require_opacus()`` says how to install
it when it is missing).
"""
