"""Federated learning: the parts of a FedAvg round (fedrun.parts) and the loop that calls them.

* ``participation`` who takes part in round r (uniform, from (seed, round); the simulated
                    federation's availability, stragglers and deadlines);
* ``placement``     which rank trains which client (on demand, by cost, by size; fixed home ranks
                    for clients with kept state);
* ``client``        one client's local training (Adam, E epochs over its own shard);
* ``drift``         update rules for client drift: FedProx, SCAFFOLD, FedDyn;
* ``compression``   compressed client updates with error feedback, and the bytes a round moves;
* ``client_state``  what clients keep between rounds, by kind, on their home ranks, gathered
                    only into checkpoints;
* ``server``        server rules that turn (global model, client average) into the next global
                    model (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, one small class each),
                    and ``RuleServer``, the server step around them;
* ``rounds``        the round loop, which only calls the parts ``fedrun.train`` built.

Each family registers its methods where they are written (fedrun.registry). Nothing here imports
``fedrun.privacy`` or ``fedrun.experimental`` (``fedrun.train`` plugs their parts in), nor
``fedrun.train`` or ``fedrun.centralized``.
"""
