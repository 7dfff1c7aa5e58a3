"""Differential privacy for fedrun, and an audit of what a trained generator leaks.

Two units of privacy (``privacy.level``):

* ``"sample"``: every client trains with DP-SGD through Opacus (per-sample gradient clipping,
  Gaussian noise, Poisson sampling of its batches): one image (a patient) is protected, and
  each client has its own (epsilon, delta), tracked over every round it took part in.
* ``"client"``: DP-FedAvg (McMahan et al., ICLR 2018): each client's update is clipped, the
  server adds Gaussian noise once per round: one whole client (a site) is protected.

Modules: ``mechanisms`` (each level as parts of the round: participation, trainer, update
rule, server wrapper), ``accountant`` (per-client ledgers over Opacus's RDP/PRV accountants, the planned
budget and its check), ``dp_sgd`` (a client's DP-SGD local training), ``client_dp`` (clipping,
Poisson client sampling and the server's noise for DP-FedAvg), ``audit`` (membership inference
and memorisation measured on a saved run: ``fedrun audit RUN_DIR``).

Opacus is an optional dependency (``pip install 'fedrun[privacy]'``): importing this package
does not import it; ``require_opacus()`` says how to install it.
"""
