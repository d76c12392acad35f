"""FlexLoRA on Flower's Deployment Engine: a ServerApp whose Flower ``Strategy`` wraps our
strategies, and the simulated-device task for SuperNodes (the ClientApp itself is
``edge_client.flower_app``). See ``docs/deployment.md``.

Submodules import Flower and the simulation on first use: ``server.runtimes.flower.server_app`` (the
ServerApp ``app``), ``server.runtimes.flower.strategy`` (``FlexLoRAFlowerStrategy``, ``probe_nodes``),
``server.runtimes.flower.simulated`` (``SimulatedTask``), ``server.runtimes.flower.config`` (run configuration).
"""
