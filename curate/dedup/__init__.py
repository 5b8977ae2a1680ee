"""Duplicate groups over a whole finished run: ``curate dedup OUT --method exact|phash|semantic``.

- :mod:`~curate.dedup.phash`: the DCT perceptual hash the run keeps in ``image_phash``;
- :mod:`~curate.dedup.groups`: labels (how a representative is chosen), pairs within a group,
  connected components;
- :mod:`~curate.dedup.kmeans`: spherical k-means in per-block pieces (SemDeDup);
- :mod:`~curate.dedup.run`: the Ray Data jobs and the driver;
- :mod:`~curate.dedup.results`: the result layout (``OUT/dedup/METHOD/``) and its readers.

The package imports nothing itself: the decode task imports only :mod:`~curate.dedup.phash`
(numpy and Pillow), and nothing here imports Ray at module level.
"""
