"""Federated learning: what one client does, what travels, what the server does with it.

* ``client``  one client's local training (Adam, E epochs over its own shard);
* ``drift``   client drift terms added to its gradients: FedProx, SCAFFOLD;
* ``client_state`` what a client keeps between rounds (Adam moments, SCAFFOLD control
              variates), on its home rank, gathered only into checkpoints;
* ``flat``    the model as one flat fp32 vector, and the buffer that one all_reduce sums;
* ``server``  server rules that turn (global model, client average) into the next global
              model: FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, one small class each;
* ``rounds``  the round loop that ties them together, readable top to bottom.

Client rules that change local training belong in ``client`` / ``drift``; server rules in
``server``. Nothing here imports ``fedrun.train`` or ``fedrun.centralized``.
"""
