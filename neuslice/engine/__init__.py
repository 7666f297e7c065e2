"""The slicing engine, in the order data flows through it: layer discovery (``graph``), hooks and
DeepLIFT multipliers (``hooks``, ``deeplift``), capture into statistics (``capture``, ``profile``,
``profiler``), metrics, slicing and the merge (``metrics``, ``slicing``, ``merge``), the ``Profile`` and
``Slices`` objects (``slices``), what a slice means for a model (``masking``), class specs and accuracy
(``classes``, ``evaluate``). The public names are re-exported by :mod:`neuslice`.
"""
