"""Corpus jobs: precomputed vision features for a whole image(-text) corpus.

One feature shard per input shard (same basename, same sample keys), resumable exactly once, on
this machine or on a Ray cluster.  Modules, in the order of the job:

- :mod:`.sources`: WebDataset tars and image folders as shards of ``(key, image bytes)`` samples;
- :mod:`.sizing`: the output's size from the image headers, against the free space;
- :mod:`.compute`: a sample stream embedded in order (in process, or through a ``serve`` fleet);
- :mod:`.layout` and :mod:`.shard`: the feature-shard format, the manifest, the fingerprint;
- :mod:`.job`: the per-shard function, resume (plan) and the summary;
- :mod:`.local` and :mod:`.ray_engine`: the two runners around the per-shard function;
- :mod:`.run`: the whole job (what ``step37-deploy embed-corpus`` runs);
- :mod:`.reader`: feature shards back to samples and Megatron-Bridge ``ImageForInsert`` groups.

docs/corpus.md describes the formats, engines, resume, bad input and sizing.
"""
