"""Point-cloud completion, PoinTr-style, on PCN or its shipped PCN-style sample.

Modules: ``geometry`` (FPS, kNN, Chamfer, F-score; pytorch3d or exact PyTorch), ``pcd`` (PCD
files), ``data`` (PCN layout and dataset), ``generate`` (PCN-style data from meshes), ``model``
(the network), ``metrics``, ``figure``, ``task`` (the :class:`~tasks.base.Task`). Nothing is
imported here, so that listing tasks stays cheap.
"""
