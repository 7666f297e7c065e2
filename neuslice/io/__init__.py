"""Every file format neuslice reads or writes: the safetensors container of profiles, slices and
models (``container``), data sets (``data``: IDX, ``.npz``, image folders, and the embedded digits of
``digits``), and model files (``modelfile``). Import the submodule you need: ``container`` sits below
the engine, ``modelfile`` above the maintenance operators, so this package imports none of them.
"""
