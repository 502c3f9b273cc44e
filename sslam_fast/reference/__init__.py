"""Plain-PyTorch references: the algorithm of docs/ALGORITHM.md in code, the CPU fallback and the test oracle.

One module per op of ``sslam_fast.ops`` (same name: ``reference/masked_mse.py`` for ``ops.masked_mse``), and
``model.py``, the pretraining losses computed with upstream's structure (per-clone ``repeat_interleave``, dense
attention, the decoder and targets as fairseq builds them), against which the model in ``sslam_fast.models`` is tested.
"""
