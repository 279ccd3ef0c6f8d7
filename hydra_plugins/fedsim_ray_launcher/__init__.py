"""fedsim's Hydra launcher for Ray: ``hydra/launcher=ray`` runs grid points as Ray tasks.

See :mod:`hydra_plugins.fedsim_ray_launcher.ray_launcher`.
"""
