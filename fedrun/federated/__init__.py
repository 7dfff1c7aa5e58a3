"""Federated learning: what one client does, what travels, what the server does with it.

* ``client``  one client's local training (fresh Adam, E epochs over its own shard);
* ``flat``    the model as one flat fp32 vector, and the buffer that one all_reduce sums;
* ``server``  server rules that turn (global model, client average) into the next global
              model: FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, one small class each;
* ``rounds``  the round loop that ties them together, readable top to bottom.

Client rules that change local training (FedProx, SCAFFOLD) belong in ``client``; server
rules in ``server``. Nothing here imports ``fedrun.train`` or ``fedrun.centralized``.
"""
